//! Entry point for the cargo-fuzz target `virtq_chain` (feature `fuzzing`, off by default):
//! a whole activated net device over guest-written rings, with a socket pair standing in for
//! the TAP. Not an API.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::{MacAddr, Net, Tap, RX_QUEUE, TX_QUEUE};
use crate::virtio::{Activation, GuestMemory, VirtioDevice, VirtioInterrupt};

/// Activates a device on `rx` and `tx`, kicks tx (the device sends every chain it can
/// parse to the "TAP"), then has the "TAP" deliver `frames` (each one that fits the
/// socket) and kicks rx. Panics only on a harness failure.
pub fn run(mem: &GuestMemory, rx: Queue, tx: Queue, frames: &[Vec<u8>]) {
    let mut fds = [0; 2];
    let kind = libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) };
    assert_eq!(rc, 0, "socketpair");
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (dev_end, mut host) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    let mut dev = Net::new(
        Tap::from_file(dev_end, "fuzz0"),
        MacAddr([2, 0, 0, 0, 0, 1]),
    )
    .expect("device");
    let evts = [(); 2].map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
    let irq = VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
    dev.ack_features(dev.device_features());
    if dev
        .activate(Activation::new(mem.clone(), vec![rx, tx], evts.into(), irq))
        .is_err()
    {
        return;
    }
    for index in [TX_QUEUE, RX_QUEUE] {
        if let Some(fd) = dev.queues.queue_fd(index) {
            dev.handle_event(fd);
        }
    }
    for f in frames {
        let _ = host.write(f);
        let fd = dev.tap.as_raw_fd();
        dev.handle_event(fd);
    }
}
