//! virtio-rng (device type 4, virtio 1.2 section 5.4): entropy for the guest.
//!
//! The guest's `virtio_rng` driver (the guest kernel has `CONFIG_HW_RANDOM_VIRTIO`) posts
//! device-writable buffers on the one request queue; the device fills each from the host's
//! getrandom(2) and returns it. The kernel's hwrng thread mixes what it reads into the
//! guest's pool, so `getrandom()` in a job is seeded from the host from early in boot, and a
//! restored clone draws fresh host entropy rather than replaying its snapshot's pool.
//!
//! Layout: [`Rng`] (`device.rs`) is the virtio device and the event-loop subscriber;
//! `state.rs` holds the serializable [`RngState`]. There is no config space and no
//! device-specific feature.
//!
//! Every chain is untrusted: readable descriptors are skipped, a chain whose writable
//! buffers lie outside guest memory is returned with used length 0 and logged, and no
//! request gets more than [`MAX_REQUEST_LEN`] bytes, so a guest cannot make the device
//! allocate or spin without bound.

mod device;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod state;

#[cfg(test)]
mod tests;

pub use device::Rng;
pub use state::{RngState, RNG_STATE_VERSION};

/// The virtio device ID of an entropy device.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Maximum size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most bytes one request is filled with; a larger buffer gets this many (the driver
/// reads the used length). Linux asks for at most a page at a time.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;

/// What can go wrong setting up or restoring an entropy device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// Creating the device's wake-up eventfd failed.
    #[error("cannot create the entropy device's wake-up eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// A state to restore came from an incompatible format.
    #[error("entropy device state has format version {found}; this kiln reads version {expected}")]
    StateVersion {
        /// The version in the state.
        found: u32,
        /// The version this build understands.
        expected: u32,
    },
    /// A state to restore does not describe queues that can exist.
    #[error("entropy device state is corrupt: {0}")]
    BadState(#[from] crate::virtio::QueueRestoreError),
}
