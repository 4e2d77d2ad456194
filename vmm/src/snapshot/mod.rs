//! Snapshots: a directory holding `state` (everything but guest memory, with a format
//! version and a checksum) and `memory` (guest RAM, written sparsely: pages that are zero
//! stay holes).
//!
//! `state` is `KILNSNAP` | format version (u32 LE) | payload length (u64 LE) | SHA-256 of
//! the payload | the payload, [`SnapshotState`] in bincode. Each part of the state is a
//! plain struct that lives beside its owner (`VcpuState`, `VmState`, `SerialState`, …).
//!
//! A diff snapshot ([`DiffInfo`]) has the same two files, but its `memory` holds only the
//! pages written since the snapshot it names as its parent; its state names that parent by
//! path and by the SHA-256 of the parent's state, so a restore that layers it over a parent
//! that has since changed is refused.

pub mod memory;
pub mod pages;
pub mod restore;

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use kiln_devices::virtio::vsock::VsockState;
use kiln_devices::virtio::MmioTransportState;
use kiln_devices::{I8042State, SerialState};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::VmState;

/// The version of the `state` layout this build writes and reads.
pub const FORMAT_VERSION: u32 = 5;
const MAGIC: &[u8; 8] = b"KILNSNAP";
const HEADER_LEN: usize = 8 + 4 + 8 + 32;
/// A state file larger than this is not one of ours.
const MAX_PAYLOAD: u64 = 64 << 20;

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// The shape of the machine a snapshot was taken of: a restore builds the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineInfo {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub irqchip: bool,
    /// The guest CID of its vsock device, if it had one.
    pub vsock_cid: Option<u64>,
}

/// A virtio device's state and its transport's.
#[derive(Serialize, Deserialize)]
pub struct VirtioSnapshot<S> {
    pub transport: MmioTransportState,
    pub device: S,
}

/// The vsock device and its transport.
pub type VsockSnapshot = VirtioSnapshot<VsockState>;
/// The network device and its transport. The TAP is not in it: each restore attaches to
/// its own.
pub type NetSnapshot = VirtioSnapshot<kiln_devices::virtio::net::NetState>;
/// The entropy device and its transport.
pub type RngSnapshot = VirtioSnapshot<kiln_devices::virtio::rng::RngState>;

/// A block device and its transport. The disk's contents are files: a read-only raw image
/// is named by path in `device`; an overlay disk's overlay was copied into the snapshot
/// directory as `overlay_file`, and a restore copies that again for each clone.
#[derive(Serialize, Deserialize)]
pub struct DiskSnapshot {
    pub transport: MmioTransportState,
    pub device: kiln_devices::virtio::block::BlockState,
    /// The copy of the overlay in the snapshot directory (a file name in it).
    pub overlay_file: Option<String>,
    /// The image's (base's) modification time when the snapshot was taken, in seconds and
    /// nanoseconds: a restore refuses an image that has changed since.
    pub image_mtime: (i64, i64),
}

/// The modification time of the image at `path`, as [`DiskSnapshot::image_mtime`] keeps it.
pub fn image_mtime(path: &Path) -> std::io::Result<(i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.mtime(), m.mtime_nsec()))
}

/// Full (all of guest memory) or diff (the pages written since the previous snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    #[default]
    Full,
    Diff,
}

/// What a diff snapshot's memory lies over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiffInfo {
    /// The snapshot directory this one layers over (absolute).
    pub parent: PathBuf,
    /// The SHA-256 of the parent's state payload when this diff was taken.
    pub parent_digest: [u8; 32],
    /// The pages this snapshot's memory file holds; every other page is the parent's.
    pub pages: pages::PageSet,
}

/// A snapshot written or restored from, as the next diff snapshot's parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRef {
    pub dir: PathBuf,
    pub digest: [u8; 32],
}

/// Everything a restore needs besides guest memory.
#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    pub machine: MachineInfo,
    pub vcpus: Vec<VcpuState>,
    /// `None` without an in-kernel irqchip.
    pub vm: Option<VmState>,
    pub serial: SerialState,
    pub i8042: I8042State,
    pub vsock: Option<VsockSnapshot>,
    /// The block devices, /dev/vda first.
    pub disks: Vec<DiskSnapshot>,
    /// The network device.
    pub net: Option<NetSnapshot>,
    /// The entropy device.
    pub rng: Option<RngSnapshot>,
    /// Set for a diff snapshot.
    pub diff: Option<DiffInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a kiln snapshot state file (bad magic)")]
    BadMagic(PathBuf),
    #[error(
        "{path} has snapshot format version {found}; this kiln reads version {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("cannot encode the snapshot state: {0}")]
    Encode(String),
    #[error("{0} already holds a snapshot; choose an empty or new directory")]
    Exists(PathBuf),
    #[error("the VM cannot be snapshotted: {0}")]
    NotSnapshottable(String),
}

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
    let mut file = File::create(&tmp).map_err(io("create", &tmp))?;
    file.write_all(&bytes).map_err(io("write", &tmp))?;
    file.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("rename into place", &path))?;
    Ok(digest)
}

/// Reads and checks `dir/state`: magic, version, length and checksum, then decodes it.
pub fn read_state(dir: &Path) -> Result<SnapshotState, SnapshotError> {
    read_state_and_digest(dir).map(|(state, _)| state)
}

/// [`read_state`], with the payload's SHA-256.
pub fn read_state_and_digest(dir: &Path) -> Result<(SnapshotState, [u8; 32]), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let mut file = File::open(&path).map_err(io("open snapshot state", &path))?;
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
    if let Some(diff) = &state.diff {
        // checked: a hostile memory_mib must not wrap into a size the page set fits.
        let bytes = state.machine.memory_mib.checked_mul(1 << 20);
        if !bytes.is_some_and(|b| diff.pages.fits(b)) {
            return Err(corrupt(
                path,
                "its diff page set does not match the guest's memory",
            ));
        }
    }
    Ok((state, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SnapshotState {
        SnapshotState {
            machine: MachineInfo {
                vcpus: 1,
                memory_mib: 16,
                irqchip: false,
                vsock_cid: None,
            },
            vcpus: Vec::new(),
            vm: None,
            serial: SerialState::default(),
            i8042: I8042State::default(),
            vsock: None,
            disks: Vec::new(),
            net: None,
            rng: None,
            diff: None,
        }
    }

    /// The error of reading a state that must not read.
    fn read_err(d: &Path) -> SnapshotError {
        match read_state(d) {
            Ok(_) => panic!("a damaged state file was accepted"),
            Err(e) => e,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-snapfmt-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_and_every_kind_of_damage() {
        let d = dir("damage");
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
        let d = dir("parse");
        write_state(&d, &sample()).unwrap();
        let bytes = std::fs::read(d.join(STATE_FILE)).unwrap();
        let state = parse_state(&d, &bytes).unwrap();
        assert_eq!(state.machine, sample().machine);
        assert_eq!(wrap(&bytes[HEADER_LEN..]), bytes);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A diff's page set is checked against the memory size without wrapping: 2^44 + 16
    /// MiB in bytes wraps to 16 MiB in u64, which a 16 MiB page set would fit.
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
            payload.extend_from_slice(&0u64.to_le_bytes()); // no vCPUs
            payload.push(0); // vm: None
            payload.extend_from_slice(&[0; 9]); // serial registers
            payload.extend_from_slice(&len.to_le_bytes());
            let e = parse_state(Path::new("x"), &wrap(&payload)).err().unwrap();
            assert!(e.to_string().contains("cannot decode"), "{e}");
        }
    }
}
