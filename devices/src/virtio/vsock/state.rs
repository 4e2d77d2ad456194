//! What a snapshot keeps of the vsock device.
//!
//! Live connections are not part of it: host sockets cannot be carried across a restore.
//! After restoring, the VMM calls [`Vsock::send_transport_reset`] so the guest drops its
//! ends of the old connections too.

use serde::{Deserialize, Serialize};

use super::device::Vsock;
use super::VsockError;
use crate::persist::Persist;
use crate::virtio::state::check_version;
use crate::virtio::{QueueRestoreArgs, QueueSnapshot};
use std::path::PathBuf;

/// The format version of [`VsockState`].
pub const VSOCK_STATE_VERSION: u32 = 2;

/// The vsock device's snapshot state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// [`VSOCK_STATE_VERSION`] when written.
    pub version: u32,
    /// The guest's CID.
    pub guest_cid: u64,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// The three queues (rx, tx, event) if the driver had activated the device, else empty.
    pub queues: Vec<QueueSnapshot>,
    /// The host-side port the next host-initiated connection gets. The guest may still hold
    /// sockets of connections made before the snapshot (until its processes close them
    /// after the transport reset); a restored device carries on from here so that no new
    /// connection reuses one of their ports, which the guest would answer with a reset.
    pub next_host_port: u32,
}

/// What a restored [`Vsock`] is built around besides its [`VsockState`]: the host side,
/// which a snapshot cannot carry.
pub struct VsockRestoreArgs {
    /// Where the device listens for host connections (as for [`Vsock::new`]).
    pub uds_path: PathBuf,
    /// For the three queues, if the state holds them.
    pub queues: QueueRestoreArgs,
}

impl Persist for Vsock {
    type State = VsockState;
    type ConstructorArgs = VsockRestoreArgs;
    type Error = VsockError;

    fn save(&self) -> VsockState {
        VsockState {
            version: VSOCK_STATE_VERSION,
            guest_cid: self.guest_cid(),
            acked_features: self.acked_features(),
            queues: self.queues.save(),
            next_host_port: self.muxer.next_local_port(),
        }
    }

    /// If the state holds queues, the device comes back active; the caller then sends
    /// [`Vsock::send_transport_reset`].
    fn restore(args: VsockRestoreArgs, state: &VsockState) -> Result<Self, VsockError> {
        let VsockRestoreArgs { uds_path, queues } = args;
        check_version(state.version, VSOCK_STATE_VERSION, |found, expected| {
            VsockError::StateVersion { found, expected }
        })?;
        let mut dev = Vsock::new(state.guest_cid, uds_path)?;
        dev.acked_features = state.acked_features;
        dev.queues.restore(&state.queues, queues)?;
        dev.muxer.continue_local_ports_at(state.next_host_port);
        Ok(dev)
    }
}
