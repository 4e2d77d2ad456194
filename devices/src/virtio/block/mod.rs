//! virtio-blk (device type 2, virtio 1.2 section 5.2): a disk image as a guest block device.
//!
//! Layout: [`Block`] (`device.rs`) is the virtio device and the event-loop subscriber; it pops
//! request chains off its one queue and hands them to `request.rs`, which checks every
//! guest-supplied descriptor, header field and length before any I/O, then runs the request
//! against a [`Disk`] backend (`disk.rs`: [`RawFile`]; `overlay.rs`: the copy-on-write
//! [`Overlay`]). `config.rs` lays out the config space; `state.rs` holds the serializable
//! [`BlockState`].
//!
//! I/O is synchronous: requests run on the event-loop thread with `pread`/`pwrite`
//! (`std::os::unix::fs::FileExt`), through a bounded bounce buffer (at most [`BOUNCE_LEN`]
//! bytes) copied with `vm_memory::Bytes::{read_slice, write_slice}`. That costs one memcpy
//! per byte and blocks the event loop for the duration of one queue drain, which is fine for
//! the small root and scratch disks of kiln's short-lived VMs and keeps the code generic over
//! the [`GuestMemory`](crate::virtio::GuestMemory) alias (no raw pointers into guest memory,
//! no `unsafe` on the data path). An io_uring or thread-pool path would replace `request.rs`'s
//! execution, not its validation.
//!
//! Durability: completed writes sit in the host page cache until the driver sends FLUSH
//! (`fdatasync` of the image or overlay). A driver that did not negotiate FLUSH cannot ask
//! for that, so for it every write and discard is synced before it completes (writethrough).
//!
//! Every chain is untrusted: a malformed request completes with `VIRTIO_BLK_S_IOERR` (or is
//! returned with used length 0 when it has no writable status byte) and is logged; nothing the
//! guest does can panic the device, make it spin, or grow its memory without bound.

mod config;
mod device;
mod disk;
mod overlay;
mod request;
mod state;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use device::Block;
pub use disk::{Disk, RawFile};
pub use overlay::{Overlay, CLUSTER_SIZE, MAX_OVERLAY_LEN};
pub use state::{Backend, BackendState, BlockConfigState, BlockState, BLOCK_STATE_VERSION};

/// The virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Maximum size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The sector size of the virtio-blk protocol (sector numbers and capacity count these).
pub const SECTOR_SIZE: u64 = 512;
/// Largest number of data segments in one request (config `seg_max`): the queue size less
/// the header and status descriptors, as Linux expects.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data segment the driver may put in one descriptor (config `size_max`, offered with
/// `VIRTIO_BLK_F_SIZE_MAX`; Linux takes it as the queue's `max_segment_size`).
pub const SIZE_MAX: u32 = 32 * 1024;
/// Largest data length of one read or write request: [`SEG_MAX`] segments of [`SIZE_MAX`]
/// bytes (7.9 MiB). A request runs synchronously on the event loop, so this bounds how long
/// one request holds it; a larger one (a driver ignoring `size_max`/`seg_max`) completes with
/// `VIRTIO_BLK_S_IOERR` without any of its data being read.
pub const MAX_REQUEST_LEN: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Largest number of sectors one discard segment may cover (config `max_discard_sectors`).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Largest number of segments in one discard request (config `max_discard_seg`).
pub const MAX_DISCARD_SEG: u32 = 32;
/// Discard alignment hint for the driver, in sectors: one overlay cluster, so that discards
/// of an overlay can punch whole clusters.
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
const _: () = assert!(DISCARD_SECTOR_ALIGNMENT as u64 * SECTOR_SIZE == CLUSTER_SIZE);
/// The config `blk_size`: the guest's logical block size, one sector.
pub const BLK_SIZE: u32 = 512;
const _: () = assert!(BLK_SIZE as u64 == SECTOR_SIZE);
/// Length of the `GET_ID` serial string.
pub const SERIAL_LEN: usize = 20;
/// The largest bounce buffer a request uses, whatever the request's length.
pub const BOUNCE_LEN: usize = 128 * 1024;

/// Feature and request-type numbers (virtio 1.2, 5.2.3 and 5.2.6).
pub mod consts {
    pub use virtio_bindings::bindings::virtio_blk::{
        VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
        VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
        VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
}

/// What can go wrong setting up or restoring a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// An image or overlay file could not be opened or created.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The base and overlay of a copy-on-write disk do not fit together.
    #[error("overlay {path} does not match its base: {reason}")]
    OverlayMismatch {
        /// The overlay file.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// Creating the device's wake-up eventfd failed.
    #[error("cannot create the block device's wake-up eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// A state to restore came from an incompatible format.
    #[error("block state has format version {found}; this kiln reads version {expected}")]
    StateVersion {
        /// The version in the state.
        found: u32,
        /// The version this build understands.
        expected: u32,
    },
    /// A state to restore does not describe a device that can exist (or the disk changed).
    #[error("block state is corrupt or does not match the disk: {0}")]
    BadState(String),
    /// A state to restore does not describe queues that can exist.
    #[error("block state is corrupt: {0}")]
    BadQueues(#[from] crate::virtio::QueueRestoreError),
}
