//! Queue chores every device does the same way: return a chain, and raise the interrupt when
//! the driver wants it. (A corrupt ring: [`VirtioInterrupt::queue_unusable`].)

use tracing::warn;
use virtio_queue::{Queue, QueueT};

use crate::virtio::{GuestMemory, VirtioInterrupt};

/// Raise the queue's interrupt if the driver wants one. `dev` names the device in logs.
pub(crate) fn notify(queue: &mut Queue, mem: &GuestMemory, irq: &VirtioInterrupt, dev: &str) {
    // An unreadable used_event means a broken driver; interrupting is the safe choice.
    if queue.needs_notification(mem).unwrap_or(true) {
        if let Err(e) = irq.signal_used_queue() {
            warn!("{dev}: cannot raise the queue interrupt: {e}");
        }
    }
}

/// Return chain `head` to the guest with `len` bytes written.
pub(crate) fn add_used(queue: &mut Queue, mem: &GuestMemory, head: u16, len: u32, dev: &str) {
    if let Err(e) = queue.add_used(mem, head, len) {
        warn!(
            head,
            "{dev}: cannot return a descriptor chain to the guest: {e}"
        );
    }
}
