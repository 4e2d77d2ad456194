//! The guest → VMM signal port: one I/O port the guest agent writes a byte to.
//!
//! The agent (PID 1 in the guest) writes [`BOOT_DONE`] to [`SIGNAL_PORT`] once it is ready for
//! work. That is the mark boot time is measured to: the first such write records the time
//! elapsed since the VMM's start and signals the boot eventfd, so the VMM's event loop learns
//! that the guest is up without polling. Later writes, and any other value, are ignored: a
//! guest cannot move the mark or flood the VMM with events.
//!
//! The port numbers and values live in `kiln_agent::marks`, shared with the agent.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kiln_agent::marks::{BOOT_DONE, SIGNAL_PORT};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Where the signal port goes on the PIO bus.
pub const GUEST_SIGNAL_BASE: u64 = SIGNAL_PORT as u64;
/// The signal port is one byte wide.
pub const GUEST_SIGNAL_LEN: u64 = 1;

/// A cheap, cloneable view of the boot-done mark.
#[derive(Debug, Clone, Default)]
pub struct BootTimer(Arc<OnceLock<Duration>>);

impl BootTimer {
    /// Time from the VMM's start to the guest's first boot-done signal, once it has come.
    pub fn boot_time(&self) -> Option<Duration> {
        self.0.get().copied()
    }
}

/// The signal-port device.
#[derive(Debug)]
pub struct GuestSignal {
    start: Instant,
    boot_evt: EventFd,
    timer: BootTimer,
}

impl GuestSignal {
    /// `start` is when the VMM process started (boot time is measured from it); `boot_evt` is
    /// written once when the guest signals boot-done.
    pub fn new(start: Instant, boot_evt: EventFd) -> Self {
        Self {
            start,
            boot_evt,
            timer: BootTimer::default(),
        }
    }

    /// A handle to read the boot time from.
    pub fn boot_timer(&self) -> BootTimer {
        self.timer.clone()
    }

    fn boot_done(&self) {
        let elapsed = self.start.elapsed();
        if self.timer.0.set(elapsed).is_err() {
            tracing::debug!("guest signal: repeated boot-done ignored");
            return;
        }
        tracing::debug!(?elapsed, "guest signalled boot-done");
        if let Err(e) = self.boot_evt.write(1) {
            tracing::warn!("guest signal: could not signal boot-done to the VMM: {e}");
        }
    }
}

impl BusDevice for GuestSignal {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        match data {
            [BOOT_DONE] => self.boot_done(),
            _ => tracing::debug!(?data, "guest signal: ignoring unknown signal"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use std::io;
    use std::sync::Mutex;

    fn pending(evt: &EventFd) -> u64 {
        match evt.read() {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("{e}"),
        }
    }

    fn rig(start: Instant) -> (Bus, BootTimer, EventFd) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = GuestSignal::new(start, evt.try_clone().unwrap());
        let timer = dev.boot_timer();
        let mut bus = Bus::new();
        bus.insert(
            Arc::new(Mutex::new(dev)),
            GUEST_SIGNAL_BASE,
            GUEST_SIGNAL_LEN,
        )
        .unwrap();
        (bus, timer, evt)
    }

    #[test]
    fn boot_done_is_recorded_once() {
        let start = Instant::now() - Duration::from_millis(250);
        let (bus, timer, evt) = rig(start);
        assert_eq!(timer.boot_time(), None);

        assert!(bus.write(GUEST_SIGNAL_BASE, &[BOOT_DONE]));
        let first = timer.boot_time().expect("boot time recorded");
        assert!(first >= Duration::from_millis(250), "{first:?}");
        assert!(first < Duration::from_secs(60), "{first:?}");
        assert_eq!(pending(&evt), 1);

        std::thread::sleep(Duration::from_millis(5));
        assert!(bus.write(GUEST_SIGNAL_BASE, &[BOOT_DONE]));
        assert_eq!(timer.boot_time(), Some(first), "the first mark stands");
        assert_eq!(pending(&evt), 0, "no second event");
    }

    #[test]
    fn other_values_are_ignored_and_reads_are_zero() {
        let (bus, timer, evt) = rig(Instant::now());
        assert!(bus.write(GUEST_SIGNAL_BASE, &[0x00]));
        assert!(bus.write(GUEST_SIGNAL_BASE, &[0x7f]));
        assert_eq!(timer.boot_time(), None);
        assert_eq!(pending(&evt), 0);

        let mut b = [0xffu8];
        assert!(bus.read(GUEST_SIGNAL_BASE, &mut b));
        assert_eq!(b, [0]);
        // A word-sized access runs past the one-byte port and is not the device's.
        assert!(!bus.write(GUEST_SIGNAL_BASE, &[BOOT_DONE, 0]));
        assert_eq!(timer.boot_time(), None);
    }

    #[test]
    fn port_matches_the_agent() {
        assert_eq!(GUEST_SIGNAL_BASE, 0x440);
    }
}
