//! virtio-vsock (device type 19): stream sockets between the guest and host Unix sockets.
//!
//! The host side follows the "hybrid vsock" convention of Firecracker and Cloud Hypervisor.
//! The device listens on one Unix socket path `P`:
//!
//! - a host client connects to `P` and writes `CONNECT <port>\n`; the device opens a
//!   connection to the guest's `port`, and when the guest accepts it writes
//!   `OK <host_port>\n` back and splices bytes both ways. If the guest refuses, the client's
//!   socket is closed.
//! - a guest connection to host port `N` (CID 2) is connected to the Unix socket `P_N`; if
//!   nothing listens there the guest gets a reset.
//!
//! Layout: [`Vsock`] (`device.rs`) is the virtio device and the event-loop subscriber; it
//! walks the queues (`packet_io.rs`) and hands packets to the `Muxer` (`muxer.rs`), which
//! owns the connections (`connection.rs`, one state machine with credit flow control each)
//! and the host sockets (`unix.rs`). Its three queues, their activation and reset, and the
//! epoll registrations are the shared `Queues` (`virtio/activation.rs`), to which the device
//! adds the host sockets the connections want watched. `state.rs` holds the serializable
//! [`VsockState`].
//!
//! Every guest-supplied descriptor, length and header field is untrusted: a malformed chain
//! is returned to the guest unused and logged, a protocol violation resets that one
//! connection, and nothing the guest does can panic the device or grow its memory without
//! bound.

mod connection;
mod device;
mod muxer;
mod packet_io;
mod state;
mod unix;

#[cfg(test)]
mod tests;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

use std::path::PathBuf;

pub use device::Vsock;
pub use state::{VsockRestoreArgs, VsockState, VSOCK_STATE_VERSION};

/// The virtio device ID of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The host's CID, the destination of every guest-initiated connection.
pub const HOST_CID: u64 = 2;

/// Queue indices.
pub const RXQ: usize = 0;
/// The transmit queue (guest → host packets).
pub const TXQ: usize = 1;
/// The event queue (transport reset).
pub const EVQ: usize = 2;
/// Maximum size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;

/// Largest payload of one packet, either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub(crate) const MAX_PKT_DATA: u32 = 64 * 1024;
/// The receive buffer each connection advertises to the guest (`buf_alloc`): at most this
/// many bytes from the guest wait in the device for a slow host reader.
pub(crate) const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Send a credit update once the guest believes it has less than this much room left.
pub(crate) const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 2;
/// Connections (plus host clients that have not sent their CONNECT line yet) at once.
pub(crate) const MAX_CONNECTIONS: usize = 1024;
/// Resets for packets that match no connection, waiting for rx buffers; more are dropped.
pub(crate) const MAX_PENDING_RESETS: usize = 256;

/// Packet operations.
pub(crate) mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// The only socket type offered: stream.
pub(crate) const TYPE_STREAM: u16 = 1;
/// SHUTDOWN flag: the sender will receive no more data.
pub(crate) const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub(crate) const SHUTDOWN_SEND: u32 = 2;
/// The event-queue event that tells the guest to drop every connection.
pub(crate) const EVENT_TRANSPORT_RESET: u32 = 0;

/// What can go wrong setting up or driving the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved (0, 1, 2) or too large.
    #[error("guest CID {0} is not usable; pick one in 3..=4294967294")]
    BadCid(u64),
    /// The Unix socket could not be created.
    #[error("cannot listen on the vsock Unix socket {path}: {source}; remove a stale socket file or pick another path")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What bind/listen said.
        #[source]
        source: std::io::Error,
    },
    /// Creating the device's wake-up eventfd failed.
    #[error("cannot create the vsock wake-up eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// An operation that needs a live device ran before the driver activated it.
    #[error("the vsock device is not active (the guest driver has not set it up)")]
    NotActive,
    /// A state to restore came from an incompatible format.
    #[error("vsock state has format version {found}; this kiln reads version {expected}")]
    StateVersion {
        /// The version in the state.
        found: u32,
        /// The version this build understands.
        expected: u32,
    },
    /// A state to restore describes queues that cannot exist.
    #[error("vsock state is corrupt: {0}")]
    BadState(#[from] crate::virtio::QueueRestoreError),
}
