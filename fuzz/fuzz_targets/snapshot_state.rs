//! The snapshot `state` file parser (`kiln::snapshot::parse_state`, what `read_state` runs
//! on the file's bytes). Two modes, picked by the first input byte:
//!
//! - even: the rest is a whole state file (magic, version, length, checksum, payload), so
//!   the header checks are fuzzed;
//! - odd: the rest is a bincode payload, wrapped in a valid header with the right length
//!   and SHA-256, so the fuzzer gets past the checksum into the bincode decode of
//!   `SnapshotState`.
//!
//! Must never panic or allocate absurdly (libFuzzer's -rss_limit_mb / -malloc_limit_mb
//! catch the latter).

#![no_main]

use std::path::Path;

use kiln::snapshot::{parse_state, FORMAT_VERSION};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let path = Path::new("fuzz-input/state");
    if mode & 1 == 0 {
        let _ = parse_state(path, rest);
        return;
    }
    let mut file = Vec::with_capacity(52 + rest.len());
    file.extend_from_slice(b"KILNSNAP");
    file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&(rest.len() as u64).to_le_bytes());
    file.extend_from_slice(&Sha256::digest(rest));
    file.extend_from_slice(rest);
    if let Err(e) = parse_state(path, &file) {
        // The header is valid: only the payload decode, or the checks of what it decoded
        // (a diff page set for another memory size), may fail.
        let msg = e.to_string();
        assert!(
            msg.contains("cannot decode") || msg.contains("diff page set"),
            "valid header refused: {msg}"
        );
    }
});
