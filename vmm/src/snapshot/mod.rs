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
//!
//! Both files are created private (0600, exclusively, never through a symbolic link) in a
//! directory created 0700; a restore opens them without following a link, checks every
//! count and size in the state ([`validate::check_state`]) and takes host files only from
//! the snapshot directory, the image store, or the command line
//! ([`validate::confine_paths`]).

pub mod memory;
pub mod pages;
pub mod restore;
mod state_file;
pub mod validate;

pub use state_file::{parse_state, read_state, read_state_and_digest, write_state};

use std::path::{Path, PathBuf};

use kiln_devices::virtio::vsock::VsockState;
use kiln_devices::virtio::MmioTransportState;
use kiln_devices::{I8042State, SerialState};
use serde::{Deserialize, Serialize};

use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::VmState;

/// The version of the `state` layout this build writes and reads.
pub const FORMAT_VERSION: u32 = 5;

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
