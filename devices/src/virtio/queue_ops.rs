//! Queue chores every device does the same way: return a chain, raise the interrupt when
//! the driver wants it, drain a request queue. (A corrupt ring: [`VirtioInterrupt::queue_unusable`].)

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::{GuestMemory, VirtioInterrupt};

/// Raise the queue's interrupt if the driver wants one. `dev` names the device in logs.
pub(crate) fn notify(queue: &mut Queue, mem: &GuestMemory, irq: &VirtioInterrupt, dev: &str) {
    // An unreadable used_event means a broken driver; interrupting is the safe choice.
    if queue.needs_notification(mem).unwrap_or(true) {
        if let Err(e) = irq.signal_used_queue() {
            crate::guest_warn!(static, "{dev}: cannot raise the queue interrupt: {e}");
        }
    }
}

/// Return chain `head` to the guest with `len` bytes written.
pub(crate) fn add_used(queue: &mut Queue, mem: &GuestMemory, head: u16, len: u32, dev: &str) {
    if let Err(e) = queue.add_used(mem, head, len) {
        crate::guest_warn!(
            static,
            head,
            "{dev}: cannot return a descriptor chain to the guest: {e}"
        );
    }
}

/// Hands every available chain of a queue the device drains (the request queues of block
/// and rng, the tx queues of net and vsock) to `handle`, returns each used with the length
/// `handle` reports, and raises the interrupt if the driver wants it. Returns whether any
/// chain was used.
///
/// `handle` also says what the chain cost, in budget units (1 for a small request; a
/// device whose requests vary in work charges more for more). At most `budget` units per
/// call: a driver that keeps adding requests (a vCPU submitting
/// as fast as the device completes) must not hold the event loop, and with it vsock and the
/// control API, forever; past the budget the device kicks its own queue eventfd `evt` and
/// carries on after the other events. A ring that keeps announcing chains it does not yield
/// is corrupt: the drain stops rather than spin, and waits for the next kick.
pub(crate) fn drain(
    queue: &mut Queue,
    mem: &GuestMemory,
    evt: &EventFd,
    (irq, dev): (&VirtioInterrupt, &str),
    budget: usize,
    mut handle: impl FnMut(DescriptorChain<&GuestMemory>) -> (u32, usize),
) -> bool {
    let mut used = false;
    let mut empty_rounds = 0;
    let mut taken = 0;
    'rounds: loop {
        // Without EVENT_IDX this sets NO_NOTIFY while we work; with it, it is a no-op.
        let _ = queue.disable_notification(mem);
        let mut popped = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let (len, cost) = handle(chain);
            add_used(queue, mem, head, len, dev);
            used = true;
            popped = true;
            taken += cost.max(1);
            if taken >= budget {
                if let Err(e) = evt.write(1) {
                    crate::guest_warn!(static, "{dev}: cannot re-kick the queue: {e}");
                }
                break 'rounds;
            }
        }
        empty_rounds = if popped { 0 } else { empty_rounds + 1 };
        match queue.enable_notification(mem) {
            Ok(true) if empty_rounds < 2 => continue,
            Ok(true) => {
                crate::guest_warn!(
                    static,
                    "{dev}: avail ring is inconsistent; waiting for the next kick"
                );
                break;
            }
            Ok(false) => break,
            Err(e) => {
                crate::guest_warn!(static, "{dev}: cannot re-enable notifications: {e}");
                break;
            }
        }
    }
    if used {
        notify(queue, mem, irq, dev);
    }
    used
}
