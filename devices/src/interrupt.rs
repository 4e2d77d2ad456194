//! An interrupt line as an `EventFd`.
//!
//! Devices never call KVM. To raise an interrupt a device writes 1 to an eventfd; the VMM has
//! registered that eventfd with KVM as an irqfd for the device's GSI, so the write injects the
//! interrupt without leaving the kernel. [`EventFdTrigger`] is that eventfd in the shape
//! vm-superio's devices want (`vm_superio::Trigger`).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An interrupt line: triggering it writes 1 to the wrapped eventfd.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wrap `evt`, the eventfd the VMM registered (or will register) as an irqfd.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// Another handle to the same eventfd (a `dup` of the descriptor).
    pub fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(Self)
    }

    /// The wrapped eventfd, e.g. to register it as an irqfd.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }
}

impl From<EventFd> for EventFdTrigger {
    fn from(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl AsRawFd for EventFdTrigger {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_counts_on_the_eventfd() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFdTrigger::new(evt.try_clone().unwrap());
        irq.trigger().unwrap();
        irq.trigger().unwrap();
        assert_eq!(evt.read().unwrap(), 2);
        // Read resets the counter: nothing pending now.
        assert_eq!(
            evt.read().unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "eventfd should be drained"
        );
    }

    #[test]
    fn clone_shares_the_same_counter() {
        let irq = EventFdTrigger::from(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let other = irq.try_clone().unwrap();
        assert_ne!(irq.as_raw_fd(), other.as_raw_fd());
        other.trigger().unwrap();
        assert_eq!(irq.event_fd().read().unwrap(), 1);
    }
}
