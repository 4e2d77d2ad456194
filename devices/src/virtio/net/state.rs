//! What a snapshot keeps of the network device.
//!
//! The TAP is not in the state: a restored VM attaches to the TAP it is given (each clone
//! its own), and frames in flight when the snapshot was taken are lost, as on a real network.

use serde::{Deserialize, Serialize};

use super::device::Net;
use super::{MacAddr, NetError, Tap};
use crate::persist::Persist;
use crate::virtio::state::check_version;
use crate::virtio::{QueueRestoreArgs, QueueSnapshot};

/// The format version of [`NetState`].
pub const NET_STATE_VERSION: u32 = 1;

/// The network device's snapshot state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// [`NET_STATE_VERSION`] when written.
    pub version: u32,
    /// The MAC address in the config space.
    pub mac: MacAddr,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// The TAP the VM was attached to (informational; a restore is given its own).
    pub tap: String,
    /// rx and tx queue if the driver had activated the device, else empty.
    pub queues: Vec<QueueSnapshot>,
}

/// What a restored [`Net`] is built around besides its [`NetState`]: the host side, which
/// a snapshot cannot carry, and the clone's own address.
pub struct NetRestoreArgs {
    /// The TAP this VM attaches to (each clone its own).
    pub tap: Tap,
    /// The MAC address for the config space; a clone may differ from the original.
    pub mac: MacAddr,
    /// For the rx and tx queues, if the state holds them.
    pub queues: QueueRestoreArgs,
}

impl Persist for Net {
    type State = NetState;
    type ConstructorArgs = NetRestoreArgs;
    type Error = NetError;

    fn save(&self) -> NetState {
        NetState {
            version: NET_STATE_VERSION,
            mac: self.mac,
            acked_features: self.acked_features,
            tap: self.tap.name().to_string(),
            queues: self.queues.save(),
        }
    }

    /// The saved `mac` is not reused: the args' one goes in the config space. If the state
    /// holds queues, the device comes back active.
    fn restore(args: NetRestoreArgs, state: &NetState) -> Result<Self, NetError> {
        let NetRestoreArgs { tap, mac, queues } = args;
        check_version(state.version, NET_STATE_VERSION, |found, expected| {
            NetError::StateVersion { found, expected }
        })?;
        let mut dev = Net::new(tap, mac)?;
        dev.acked_features = state.acked_features;
        // With its queues back, the device is woken to look at both rings once: kicks that
        // were in flight are gone.
        dev.queues.restore(&state.queues, queues)?;
        Ok(dev)
    }
}
