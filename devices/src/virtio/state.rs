//! Serializable snapshot pieces shared by virtio devices and the transport.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

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

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// A queue back from its snapshot, checked to be ready and inside `mem`.
pub(crate) fn restore_queue(
    q: &QueueSnapshot,
    mem: &crate::virtio::GuestMemory,
) -> Result<virtio_queue::Queue, String> {
    use virtio_queue::QueueT;
    let queue = virtio_queue::Queue::try_from(QueueState::from(*q)).map_err(|e| e.to_string())?;
    if !queue.is_valid(mem) {
        return Err("the queue is not ready or lies outside guest memory".into());
    }
    Ok(queue)
}
