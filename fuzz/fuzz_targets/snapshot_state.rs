//! The snapshot `state` file parser (`kiln::snapshot::parse_state`, what `read_state` runs
//! on the file's bytes). Two modes, picked by the first input byte:
//!
//! - even: the rest is a whole state file (magic, version, length, checksum, payload), so
//!   the header checks are fuzzed;
//! - odd: the rest is a bincode payload, wrapped in a valid header with the right length
//!   and SHA-256, so the fuzzer gets past the checksum into the bincode decode of
//!   `SnapshotState` and the checks a restore relies on (`validate::check_state`: counts,
//!   sizes, parts that must agree).
//!
//! A state that passes must hold what `Vmm::restore` assumes without checking again: at
//! least one vCPU state, one per vCPU, a memory size whose byte count does not wrap, at
//! most `MAX_DISKS` disks, each device at its own MMIO window, and a diff page set over
//! exactly that memory.
//!
//! Must never panic or allocate absurdly (libFuzzer's -rss_limit_mb / -malloc_limit_mb
//! catch the latter).

#![no_main]

use std::path::Path;

use kiln::snapshot::validate::{check_state, MAX_MEMORY_MIB};
use kiln::snapshot::{parse_state, SnapshotError, SnapshotState, FORMAT_VERSION};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let path = Path::new("fuzz-input/state");
    if mode & 1 == 0 {
        if let Ok(state) = parse_state(path, rest) {
            holds_what_restore_assumes(&state);
        }
        return;
    }
    let mut file = Vec::with_capacity(52 + rest.len());
    file.extend_from_slice(b"KILNSNAP");
    file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&(rest.len() as u64).to_le_bytes());
    file.extend_from_slice(&Sha256::digest(rest));
    file.extend_from_slice(rest);
    match parse_state(path, &file) {
        Ok(state) => holds_what_restore_assumes(&state),
        // The header is valid: only the payload decode, or the checks of what it decoded,
        // may fail, and they say the file is corrupt.
        Err(SnapshotError::Corrupt { .. }) => {}
        Err(e) => panic!("valid header refused: {e}"),
    }
});

fn holds_what_restore_assumes(state: &SnapshotState) {
    assert_eq!(
        check_state(state),
        Ok(()),
        "accepted, but the checks refuse it"
    );
    let machine = &state.machine;
    assert!(machine.vcpus >= 1 && state.vcpus.len() == usize::from(machine.vcpus));
    assert!(machine.memory_mib <= MAX_MEMORY_MIB);
    let bytes = machine
        .memory_mib
        .checked_mul(1 << 20)
        .expect("memory size wraps");
    assert!(state.devices.disks().count() <= kiln::disk::MAX_DISKS);
    // Every device at a window kiln hands out, no two at one.
    let mut windows = kiln::device_manager::Windows::default();
    for device in &state.devices.virtio {
        assert!(windows.claim(device.window).is_ok(), "{:?}", device.window);
    }
    if let Some(diff) = &state.diff {
        assert!(diff.pages.fits(bytes));
    }
}
