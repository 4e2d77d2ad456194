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

/// A queue back from its snapshot, checked to be ready and inside `mem`.
pub(crate) fn restore_queue(
    q: &QueueSnapshot,
    mem: &crate::virtio::GuestMemory,
) -> Result<virtio_queue::Queue, String> {
    use virtio_queue::QueueT;
    let queue = virtio_queue::Queue::try_from(QueueState::from(q)).map_err(|e| e.to_string())?;
    if !queue.is_valid(mem) {
        return Err("the queue is not ready or lies outside guest memory".into());
    }
    Ok(queue)
}
