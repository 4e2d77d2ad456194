//! What a snapshot keeps of the entropy device: the negotiated features and the queue.
//! Nothing else carries over; random bytes are drawn fresh after a restore.

use serde::{Deserialize, Serialize};

use super::device::Rng;
use super::RngError;
use crate::persist::Persist;
use crate::virtio::state::check_version;
use crate::virtio::{QueueRestoreArgs, QueueSnapshot};

/// The format version of [`RngState`].
pub const RNG_STATE_VERSION: u32 = 1;

/// The entropy device as a snapshot records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub version: u32,
    pub acked_features: u64,
    /// The request queue while the device is active; empty before activation.
    pub queues: Vec<QueueSnapshot>,
}

impl Persist for Rng {
    type State = RngState;
    type ConstructorArgs = QueueRestoreArgs;
    type Error = RngError;

    fn save(&self) -> RngState {
        RngState {
            version: RNG_STATE_VERSION,
            acked_features: self.acked_features,
            queues: self.queues.save(),
        }
    }

    fn restore(args: QueueRestoreArgs, state: &RngState) -> Result<Self, RngError> {
        check_version(state.version, RNG_STATE_VERSION, |found, expected| {
            RngError::StateVersion { found, expected }
        })?;
        let mut dev = Rng::new()?;
        dev.acked_features = state.acked_features;
        dev.queues.restore(&state.queues, args)?;
        Ok(dev)
    }
}
