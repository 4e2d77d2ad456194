//! Entry point for the cargo-fuzz target `virtq_chain` (feature `fuzzing`, off by default):
//! an activated entropy device over guest-written rings. Not an API.

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::Rng;
use crate::virtio::{Activation, GuestMemory, VirtioDevice, VirtioInterrupt};

/// Activates a device on `queue` and has it fill every chain it can (each with at most
/// [`MAX_REQUEST_LEN`](super::MAX_REQUEST_LEN) bytes). Panics only on a harness failure.
pub fn run(mem: &GuestMemory, queue: Queue) {
    let mut dev = Rng::new().expect("device");
    let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let irq = VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
    dev.ack_features(dev.device_features());
    if dev
        .activate(Activation::new(mem.clone(), vec![queue], vec![evt], irq))
        .is_err()
    {
        return;
    }
    dev.process_queue();
}
