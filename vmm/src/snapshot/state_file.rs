//! The `state` file: `KILNSNAP` | format version (u32 LE) | payload length (u64 LE) |
//! SHA-256 of the payload | the payload, [`SnapshotState`] in bincode. Written through a
//! temporary file and a rename; read back only if magic, version, length and checksum all
//! hold, so that a truncated, corrupt or foreign file is refused with what is wrong.

use std::io::{Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{SnapshotError, SnapshotState, FORMAT_VERSION, STATE_FILE};

const MAGIC: &[u8; 8] = b"KILNSNAP";
const HEADER_LEN: usize = 8 + 4 + 8 + 32;
/// A state file larger than this is not one of ours.
const MAX_PAYLOAD: u64 = 64 << 20;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Writes `state` to `dir/state` (through a temporary file and a rename). Returns the
/// payload's SHA-256, by which a diff snapshot names this one as its parent.
pub fn write_state(dir: &Path, state: &SnapshotState) -> Result<[u8; 32], SnapshotError> {
    let payload = bincode::serialize(state).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let digest: [u8; 32] = Sha256::digest(&payload).into();
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&digest);
    bytes.extend_from_slice(&payload);
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(".state.tmp");
    // A leftover of a failed attempt goes first: the new file is created exclusively,
    // private (0600), never through a link planted under that name.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("remove", &tmp)(e)),
        _ => {}
    }
    let mut file = kiln_devices::private::create_file(&tmp).map_err(io("create", &tmp))?;
    file.write_all(&bytes).map_err(io("write", &tmp))?;
    file.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("rename into place", &path))?;
    Ok(digest)
}

/// Reads and checks `dir/state`: magic, version, length and checksum, then decodes it and
/// checks its counts and sizes ([`super::validate::check_state`]). A `state` that is a
/// symbolic link is refused.
pub fn read_state(dir: &Path) -> Result<SnapshotState, SnapshotError> {
    read_state_and_digest(dir).map(|(state, _)| state)
}

/// [`read_state`], with the payload's SHA-256.
pub fn read_state_and_digest(dir: &Path) -> Result<(SnapshotState, [u8; 32]), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let mut file =
        kiln_devices::private::open_nofollow(&path).map_err(io("open snapshot state", &path))?;
    let mut header = [0u8; HEADER_LEN];
    file.read_exact(&mut header)
        .map_err(|_| corrupt(&path, "shorter than its header"))?;
    let len = check_header(&path, &header)?;
    let mut payload = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.read_to_end(&mut payload).map_err(io("read", &path))?;
    decode_payload(&path, &header, len, &payload)
}

/// Checks and decodes the bytes of a whole state file, as [`read_state`] does; `path` only
/// names it in errors. The fuzzing entry point (`fuzz/`, target `snapshot_state`).
#[doc(hidden)]
pub fn parse_state(path: &Path, bytes: &[u8]) -> Result<SnapshotState, SnapshotError> {
    let Some((header, payload)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(corrupt(path, "shorter than its header"));
    };
    let len = check_header(path, header)?;
    decode_payload(path, header, len, payload).map(|(state, _)| state)
}

fn corrupt(path: &Path, why: &str) -> SnapshotError {
    SnapshotError::Corrupt {
        path: path.to_owned(),
        why: why.to_string(),
    }
}

/// Checks the magic and the version; returns the payload length the header announces.
fn check_header(path: &Path, header: &[u8; HEADER_LEN]) -> Result<u64, SnapshotError> {
    if &header[..8] != MAGIC {
        return Err(SnapshotError::BadMagic(path.to_owned()));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: path.to_owned(),
            found: version,
        });
    }
    let len = u64::from_le_bytes(header[12..20].try_into().unwrap_or_default());
    if len > MAX_PAYLOAD {
        return Err(corrupt(path, "its length field is absurd"));
    }
    Ok(len)
}

/// Checks the payload's length and checksum against the header, then decodes it; returns
/// the state and the payload's SHA-256.
fn decode_payload(
    path: &Path,
    header: &[u8; HEADER_LEN],
    len: u64,
    payload: &[u8],
) -> Result<(SnapshotState, [u8; 32]), SnapshotError> {
    if payload.len() as u64 != len {
        return Err(corrupt(
            path,
            &format!("{} payload bytes, the header says {len}", payload.len()),
        ));
    }
    let digest: [u8; 32] = Sha256::digest(payload).into();
    if digest[..] != header[20..52] {
        return Err(corrupt(path, "checksum mismatch"));
    }
    let state: SnapshotState =
        bincode::deserialize(payload).map_err(|e| corrupt(path, &format!("cannot decode: {e}")))?;
    // Every count and size, before anyone sizes anything by them.
    super::validate::check_state(&state).map_err(|e| corrupt(path, &e.0))?;
    Ok((state, digest))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::snapshot::{pages, DiffInfo};
    use crate::test_util::scratch;

    fn sample() -> SnapshotState {
        crate::snapshot::validate::tests::sample()
    }

    /// The error of reading a state that must not read.
    fn read_err(d: &Path) -> SnapshotError {
        match read_state(d) {
            Ok(_) => panic!("a damaged state file was accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn round_trip_and_every_kind_of_damage() {
        let d = scratch("snapfmt-damage");
        write_state(&d, &sample()).unwrap();
        assert_eq!(read_state(&d).unwrap().machine, sample().machine);
        let path = d.join(STATE_FILE);
        let good = std::fs::read(&path).unwrap();

        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        std::fs::write(&path, &flipped).unwrap();
        let e = read_err(&d).to_string();
        assert!(e.contains("checksum mismatch"), "{e}");

        let mut version = good.clone();
        version[8] = 99;
        std::fs::write(&path, &version).unwrap();
        let e = read_err(&d).to_string();
        assert!(e.contains("format version 99"), "{e}");

        std::fs::write(&path, &good[..good.len() - 3]).unwrap();
        let e = read_err(&d).to_string();
        assert!(e.contains("payload bytes"), "{e}");

        std::fs::write(&path, b"hello").unwrap();
        assert!(read_err(&d).to_string().contains("shorter than its header"));
        std::fs::write(&path, [0u8; 64]).unwrap();
        assert!(matches!(read_state(&d), Err(SnapshotError::BadMagic(_))));
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// `bytes` as a state file with a valid header (what fuzz target `snapshot_state` does).
    fn wrap(payload: &[u8]) -> Vec<u8> {
        let mut file = MAGIC.to_vec();
        file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        file.extend_from_slice(&Sha256::digest(payload));
        file.extend_from_slice(payload);
        file
    }

    #[test]
    fn parse_state_reads_what_write_state_wrote() {
        let d = scratch("snapfmt-parse");
        write_state(&d, &sample()).unwrap();
        let bytes = std::fs::read(d.join(STATE_FILE)).unwrap();
        let state = parse_state(&d, &bytes).unwrap();
        assert_eq!(state.machine, sample().machine);
        assert_eq!(wrap(&bytes[HEADER_LEN..]), bytes);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A diff's page set is checked against the memory size without wrapping: 2^44 + 16
    /// MiB in bytes wraps to 16 MiB in u64, which a 16 MiB page set would fit (the size
    /// itself is refused first).
    #[test]
    fn a_memory_size_that_wraps_does_not_fit_a_page_set() {
        let mut state = sample();
        state.machine.memory_mib = (1 << 44) + 16;
        state.diff = Some(DiffInfo {
            parent: PathBuf::from("/parent"),
            parent_digest: [0; 32],
            pages: pages::PageSet::new(16 << 20),
        });
        let payload = bincode::serialize(&state).unwrap();
        let e = parse_state(Path::new("x"), &wrap(&payload)).err().unwrap();
        assert!(e.to_string().contains("MiB of memory"), "{e}");
        state.machine.memory_mib = 32;
        let payload = bincode::serialize(&state).unwrap();
        let e = parse_state(Path::new("x"), &wrap(&payload)).err().unwrap();
        assert!(e.to_string().contains("diff page set"), "{e}");
        state.machine.memory_mib = 16;
        let payload = bincode::serialize(&state).unwrap();
        parse_state(Path::new("x"), &wrap(&payload)).unwrap();
    }

    /// Length prefixes in a hostile payload (which passed the checksum) do not make the
    /// decoder allocate what they claim: serde preallocates at most 1 MiB per sequence and
    /// bincode's slice reader checks byte lengths against the bytes that are there.
    #[test]
    fn huge_length_prefixes_are_refused_without_allocating_them() {
        let machine = bincode::serialize(&sample().machine).unwrap();
        for len in [u64::MAX, 1 << 40, u64::from(u32::MAX)] {
            // `vcpus`: a Vec<VcpuState> claiming `len` entries, with none there.
            let mut payload = machine.clone();
            payload.extend_from_slice(&len.to_le_bytes());
            let e = parse_state(Path::new("x"), &wrap(&payload)).err().unwrap();
            assert!(e.to_string().contains("cannot decode"), "{e}");
            // The serial console's `in_buffer` (a Vec<u8>) claiming `len` bytes.
            let mut payload = machine.clone();
            payload.extend_from_slice(&0u64.to_le_bytes()); // no vCPUs (decoding fails first)
            payload.push(0); // vm: None
            payload.extend_from_slice(&[0; 9]); // serial registers
            payload.extend_from_slice(&len.to_le_bytes());
            let e = parse_state(Path::new("x"), &wrap(&payload)).err().unwrap();
            assert!(e.to_string().contains("cannot decode"), "{e}");
        }
    }
}
