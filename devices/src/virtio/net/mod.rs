//! virtio-net (device type 1, virtio 1.2 section 5.1): an Ethernet interface backed by a
//! host TAP device.
//!
//! Layout: [`Net`] (`device.rs`) is the virtio device and the event-loop subscriber, and
//! `io.rs` its two data paths; `frames.rs` copies one frame between a descriptor chain and a
//! bounce buffer, checking every descriptor the guest supplies; `tap.rs` opens the TAP (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, no
//! offloads, nonblocking); `state.rs` holds the serializable [`NetState`].
//!
//! Frames carry the 12-byte `virtio_net_hdr_v1` in front on both sides: the TAP is told the
//! same header size (TUNSETVNETHDRSZ), so a frame goes through unchanged apart from the
//! header fields that no negotiated feature allows (they are cleared). No offload is offered
//! (no CSUM, no TSO, no MRG_RXBUF), so every frame fits in one Linux "small" rx buffer and the
//! TAP never hands over a GSO super-frame: the host stack computes checksums itself.
//!
//! RX: the TAP fd is watched edge-triggered; the device reads frames until the TAP is empty or
//! the guest has no rx buffer left. In the second case the frame waits in the device, and the
//! guest's next rx kick (it refills the ring) resumes the drain. TX: each kick drains the tx
//! queue, at most [`CHAIN_BUDGET`] chains per event, writing each frame to the TAP.
//!
//! Every chain is untrusted: a chain of the wrong direction, outside guest memory, too short
//! for the frame or longer than [`MAX_FRAME_LEN`] is returned with used length 0 and the frame
//! is dropped; a corrupt avail ring marks the device broken (DEVICE_NEEDS_RESET).

mod device;
mod frames;
mod io;
mod mac;
mod state;
pub mod tap;

#[cfg(test)]
mod tests;

#[cfg(feature = "fuzzing")]
pub mod fuzzing;

pub use device::{Net, NetStats};
pub use mac::{MacAddr, MacParseError};
pub use state::{NetRestoreArgs, NetState, NET_STATE_VERSION};
pub use tap::{Tap, TapError};

/// The virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue (device to guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest to device).
pub const TX_QUEUE: usize = 1;
/// Size of `virtio_net_hdr_v1` (with `num_buffers`), in front of every frame.
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame with its header the device moves: a 64 KiB IP packet, an Ethernet
/// header with a VLAN tag, and the vnet header. Anything larger is dropped.
pub const MAX_FRAME_LEN: usize = 65535 + 18 + VNET_HDR_LEN;
/// The most tx chains one event takes; the device kicks itself to come back for the rest.
pub const CHAIN_BUDGET: usize = 2 * QUEUE_SIZE as usize;

/// Feature bits (virtio 1.2, 5.1.3).
pub mod consts {
    pub use virtio_bindings::bindings::virtio_net::VIRTIO_NET_F_MAC;
}

/// What can go wrong setting up or restoring a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP device could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// Creating the device's wake-up eventfd failed.
    #[error("cannot create the network device's wake-up eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// A state to restore came from an incompatible format.
    #[error("net state has format version {found}; this kiln reads version {expected}")]
    StateVersion {
        /// The version in the state.
        found: u32,
        /// The version this build understands.
        expected: u32,
    },
    /// A state to restore does not describe queues that can exist.
    #[error("net state is corrupt: {0}")]
    BadState(#[from] crate::virtio::QueueRestoreError),
}
