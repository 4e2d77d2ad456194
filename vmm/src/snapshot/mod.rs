//! Snapshots: a directory holding `state` (everything but guest memory, with a format
//! version and a checksum) and `memory` (guest RAM, written sparsely: pages that are zero
//! stay holes).
//!
//! `state` is `KILNSNAP` | format version (u32 LE) | payload length (u64 LE) | SHA-256 of
//! the payload | the payload, [`SnapshotState`] in bincode. Each part of the state is a
//! plain struct that lives beside its owner (`VcpuState`, `VmState`, `DevicesState`, …).
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

use serde::{Deserialize, Serialize};

use crate::device_manager::DevicesState;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::VmState;

/// The version of the `state` layout this build writes and reads.
pub const FORMAT_VERSION: u32 = 7;

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

/// The modification time of the image at `path`, as a snapshot keeps it
/// ([`crate::device_manager::DiskState::image_mtime`]).
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
    /// Every device, each virtio device with the MMIO window and line it sat at.
    pub devices: DevicesState,
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
