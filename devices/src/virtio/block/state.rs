//! What a snapshot keeps of the block device, and the backend choice it records.
//!
//! The disk's contents are not in the state: a raw image is the file itself, and an
//! overlay's state is its cluster bitmap plus the overlay file, which the VMM copies while
//! the VM is paused (see `overlay.rs`). Restoring reopens the files by path and checks that
//! the disk still has the capacity the guest saw.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::device::Block;
use super::disk::{Disk, RawFile};
use super::overlay::{Overlay, CLUSTER_SIZE};
use super::{BlockError, SERIAL_LEN};
use crate::persist::Persist;
use crate::virtio::state::check_version;
use crate::virtio::{QueueRestoreArgs, QueueSnapshot, VirtioDevice};

/// The format version of [`BlockState`].
pub const BLOCK_STATE_VERSION: u32 = 1;

/// A block device's storage.
#[derive(Debug)]
pub enum Backend {
    /// A raw image file.
    Raw(RawFile),
    /// A copy-on-write overlay over a shared base image.
    Overlay(Overlay),
}

impl Backend {
    pub(crate) fn disk(&self) -> &dyn Disk {
        match self {
            Backend::Raw(r) => r,
            Backend::Overlay(o) => o,
        }
    }

    pub(crate) fn disk_mut(&mut self) -> &mut dyn Disk {
        match self {
            Backend::Raw(r) => r,
            Backend::Overlay(o) => o,
        }
    }
}

impl From<RawFile> for Backend {
    fn from(r: RawFile) -> Self {
        Backend::Raw(r)
    }
}

impl From<Overlay> for Backend {
    fn from(o: Overlay) -> Self {
        Backend::Overlay(o)
    }
}

/// How to reopen a backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendState {
    /// A raw image.
    Raw {
        /// The image file.
        path: PathBuf,
        /// Whether it was opened read-only.
        read_only: bool,
    },
    /// A copy-on-write overlay.
    Overlay {
        /// The shared base image.
        base: PathBuf,
        /// The per-VM overlay file.
        overlay: PathBuf,
        /// [`CLUSTER_SIZE`] when saved.
        cluster_size: u64,
        /// The cluster bitmap ([`Overlay::bitmap`]).
        bitmap: Vec<u64>,
    },
}

/// The config space values the guest saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfigState {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Whether the device was read-only.
    pub read_only: bool,
    /// The features the device offered.
    pub device_features: u64,
}

/// The block device's snapshot state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// [`BLOCK_STATE_VERSION`] when written.
    pub version: u32,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// The config space.
    pub config: BlockConfigState,
    /// The GET_ID serial.
    pub serial: [u8; SERIAL_LEN],
    /// The storage.
    pub backend: BackendState,
    /// The request queue if the driver had activated the device, else empty.
    pub queues: Vec<QueueSnapshot>,
}

impl Persist for Block {
    type State = BlockState;
    /// Guest memory and the queue's eventfd (one) and interrupt; the state names the files.
    type ConstructorArgs = QueueRestoreArgs;
    type Error = BlockError;

    /// Taken with the event loop idle as well, so no request is half done.
    fn save(&self) -> BlockState {
        let backend = match &self.backend {
            Backend::Raw(r) => BackendState::Raw {
                path: r.path().to_path_buf(),
                read_only: r.is_read_only(),
            },
            Backend::Overlay(o) => BackendState::Overlay {
                base: o.base_path().to_path_buf(),
                overlay: o.overlay_path().to_path_buf(),
                cluster_size: CLUSTER_SIZE,
                bitmap: o.bitmap().to_vec(),
            },
        };
        BlockState {
            version: BLOCK_STATE_VERSION,
            acked_features: self.acked_features,
            config: BlockConfigState {
                capacity: self.capacity(),
                read_only: self.is_read_only(),
                device_features: self.device_features(),
            },
            serial: self.serial,
            backend,
            queues: self.queues.save(),
        }
    }

    /// Reopens the state's files and checks the disk still looks as the guest saw it. If
    /// the state holds a queue, the device comes back active.
    fn restore(args: QueueRestoreArgs, state: &BlockState) -> Result<Self, BlockError> {
        check_version(state.version, BLOCK_STATE_VERSION, |found, expected| {
            BlockError::StateVersion { found, expected }
        })?;
        let backend: Backend = match &state.backend {
            BackendState::Raw { path, read_only } => RawFile::open(path, *read_only)?.into(),
            BackendState::Overlay {
                base,
                overlay,
                cluster_size,
                bitmap,
            } => {
                if *cluster_size != CLUSTER_SIZE {
                    return Err(BlockError::BadState(format!(
                        "overlay cluster size {cluster_size}; this kiln uses {CLUSTER_SIZE}"
                    )));
                }
                Overlay::reopen(base, overlay, bitmap.clone())?.into()
            }
        };
        let mut dev = Block::new(backend, &state.serial)?;
        let now = BlockConfigState {
            capacity: dev.capacity(),
            read_only: dev.is_read_only(),
            device_features: dev.device_features(),
        };
        if now != state.config {
            return Err(BlockError::BadState(format!(
                "the guest saw {:?}, the disk now gives {now:?}",
                state.config
            )));
        }
        dev.acked_features = state.acked_features;
        dev.queues.restore(&state.queues, args)?;
        Ok(dev)
    }
}
