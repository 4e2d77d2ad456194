//! What a snapshot keeps of the vsock device.
//!
//! Live connections are not part of it: host sockets cannot be carried across a restore.
//! After restoring, the VMM calls [`Vsock::send_transport_reset`] so the guest drops its
//! ends of the old connections too.

use serde::{Deserialize, Serialize};

use super::device::{Active, Vsock};
use super::VsockError;
use crate::persist::Persist;
use crate::virtio::state::{check_version, restore_queue};
use crate::virtio::{QueueRestoreArgs, QueueRestoreError, QueueSnapshot};
use std::path::PathBuf;

/// The format version of [`VsockState`].
pub const VSOCK_STATE_VERSION: u32 = 1;

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
            queues: self
                .active
                .as_ref()
                .map(|a| a.queues.iter().map(|q| (&q.state()).into()).collect())
                .unwrap_or_default(),
        }
    }

    /// If the state holds queues, the device comes back active; the caller then sends
    /// [`Vsock::send_transport_reset`].
    fn restore(args: VsockRestoreArgs, state: &VsockState) -> Result<Self, VsockError> {
        let VsockRestoreArgs {
            uds_path,
            queues:
                QueueRestoreArgs {
                    mem,
                    queue_evts,
                    interrupt,
                },
        } = args;
        check_version(state.version, VSOCK_STATE_VERSION, |found, expected| {
            VsockError::StateVersion { found, expected }
        })?;
        let mut dev = Vsock::new(state.guest_cid, uds_path)?;
        dev.acked_features = state.acked_features;
        if state.queues.is_empty() {
            return Ok(dev);
        }
        if state.queues.len() != 3 || queue_evts.len() != 3 {
            return Err(VsockError::BadState(QueueRestoreError::Count {
                saved: state.queues.len(),
                evts: queue_evts.len(),
                device: "vsock",
                expected: 3,
            }));
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| restore_queue(i, q, &mem))
            .collect::<Result<Vec<_>, _>>()?;
        dev.active = Some(Active {
            mem,
            queues,
            evts: queue_evts,
            interrupt,
        });
        Ok(dev)
    }
}
