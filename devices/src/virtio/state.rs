//! Serializable snapshot pieces shared by virtio devices and the transport.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;
use vmm_sys_util::eventfd::EventFd;

use super::{GuestMemory, VirtioInterrupt};

/// What the transport hands every virtio device it restores, for the queues the device's
/// state holds: guest memory, the queues' notification eventfds (clones of the
/// transport's) and the interrupt to raise.
pub struct QueueRestoreArgs {
    pub mem: GuestMemory,
    pub queue_evts: Vec<EventFd>,
    pub interrupt: VirtioInterrupt,
}

/// One virtqueue's state, field for field `virtio_queue::QueueState`, serializable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// The device's maximum size.
    pub max_size: u16,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// Whether VIRTIO_RING_F_EVENT_IDX is in use.
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    /// Whether the driver marked the queue ready.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
}

// The conversions both ways between [`QueueSnapshot`] and `QueueState`, field for field.
crate::persist::field_for_field!(
    QueueSnapshot,
    QueueState,
    [
        max_size,
        next_avail,
        next_used,
        event_idx_enabled,
        size,
        ready,
        desc_table,
        avail_ring,
        used_ring,
    ]
);

/// Checks that a state to restore was written in the format version this build reads,
/// `expected`. On a mismatch, `mismatch(found, expected)` makes the device's own error.
pub(crate) fn check_version<E>(
    found: u32,
    expected: u32,
    mismatch: impl FnOnce(u32, u32) -> E,
) -> Result<(), E> {
    if found == expected {
        Ok(())
    } else {
        Err(mismatch(found, expected))
    }
}

/// Why saved queues cannot come back.
#[derive(Debug, thiserror::Error)]
pub enum QueueRestoreError {
    /// The saved registers do not describe a queue (a size that is not a power of two, a
    /// misaligned ring, …).
    #[error("queue {index}: {source}")]
    Invalid {
        /// The queue's index.
        index: usize,
        /// What virtio-queue refused.
        source: virtio_queue::Error,
    },
    /// The queue is not ready, or its rings lie outside guest memory.
    #[error("queue {index}: the queue is not ready or lies outside guest memory")]
    Unusable {
        /// The queue's index.
        index: usize,
    },
    /// The state and the transport do not hand over as many queues as the device has.
    #[error("{saved} queues and {evts} queue eventfds; {device} has {expected}")]
    Count {
        /// Queues in the state.
        saved: usize,
        /// Queue eventfds handed over.
        evts: usize,
        /// The device, as its log lines name it.
        device: &'static str,
        /// Queues the device has.
        expected: usize,
    },
}

/// Queue `index` as the driver had set it up, from its snapshot; the registers checked.
pub(crate) fn queue_from(
    index: usize,
    q: &QueueSnapshot,
) -> Result<virtio_queue::Queue, QueueRestoreError> {
    virtio_queue::Queue::try_from(QueueState::from(q))
        .map_err(|source| QueueRestoreError::Invalid { index, source })
}

/// Queue `index` back from its snapshot, checked to be ready and inside `mem`.
pub(crate) fn restore_queue(
    index: usize,
    q: &QueueSnapshot,
    mem: &crate::virtio::GuestMemory,
) -> Result<virtio_queue::Queue, QueueRestoreError> {
    use virtio_queue::QueueT;
    let queue = queue_from(index, q)?;
    if !queue.is_valid(mem) {
        return Err(QueueRestoreError::Unusable { index });
    }
    Ok(queue)
}
