//! The guest → VMM signal port: one I/O port the guest agent writes a byte to.
//!
//! The agent (PID 1 in the guest) writes [`BOOT_DONE`] to [`SIGNAL_PORT`] once it is ready for
//! work. That is the mark boot time is measured to: the first such write records the time
//! elapsed since the VMM's start and signals the boot eventfd, so the VMM's event loop learns
//! that the guest is up without polling. Later writes, and any other value, are ignored: a
//! guest cannot move the mark or flood the VMM with events.
//!
//! The port numbers and values live in `kiln_agent::marks`, shared with the agent.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kiln_agent::marks::{
    BOOT_DONE, SIGNAL_PORT, SNAPSHOT_FAILED, SNAPSHOT_REQUEST, SNAPSHOT_UNSUPPORTED,
};
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

/// The VMM's side of guest snapshot requests: it learns of one through the eventfd given
/// to [`GuestSignal::with_snapshot_requests`] and reports the outcome here.
#[derive(Debug, Clone, Default)]
pub struct SnapshotRequests(Arc<SnapshotShared>);

#[derive(Debug, Default)]
struct SnapshotShared {
    /// A request is being served; further ones are ignored until it completes.
    pending: AtomicBool,
    /// What a read of the port returns (see `kiln_agent::marks::SNAPSHOT_REQUEST`).
    status: AtomicU8,
}

impl SnapshotRequests {
    /// Reports the pending request done (`ok`) or failed; the guest sees it on its next read.
    pub fn complete(&self, ok: bool) {
        let count =
            (self.0.status.load(Ordering::Acquire) & !SNAPSHOT_FAILED).wrapping_add(1) & 0x7f;
        let status = if ok { count } else { count | SNAPSHOT_FAILED };
        self.0.status.store(status, Ordering::Release);
        self.0.pending.store(false, Ordering::Release);
    }
}

/// The signal-port device.
#[derive(Debug)]
pub struct GuestSignal {
    start: Instant,
    boot_evt: EventFd,
    timer: BootTimer,
    snapshot: Option<(EventFd, SnapshotRequests)>,
}

impl GuestSignal {
    /// `start` is when the VMM process started (boot time is measured from it); `boot_evt` is
    /// written once when the guest signals boot-done.
    pub fn new(start: Instant, boot_evt: EventFd) -> Self {
        Self {
            start,
            boot_evt,
            timer: BootTimer::default(),
            snapshot: None,
        }
    }

    /// Lets the guest ask for snapshots: a request writes `evt`; the VMM answers through the
    /// returned handle. Without this, requests are ignored (and reads say "unsupported").
    pub fn with_snapshot_requests(mut self, evt: EventFd) -> (Self, SnapshotRequests) {
        let requests = SnapshotRequests::default();
        self.snapshot = Some((evt, requests.clone()));
        (self, requests)
    }

    fn snapshot_requested(&self) {
        let Some((evt, requests)) = &self.snapshot else {
            tracing::warn!("the guest asked for a snapshot, but this VM takes none on request");
            return;
        };
        if requests.0.pending.swap(true, Ordering::AcqRel) {
            tracing::debug!("guest signal: snapshot already requested");
            return;
        }
        if let Err(e) = evt.write(1) {
            tracing::warn!("guest signal: could not pass on a snapshot request: {e}");
            requests.complete(false);
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
        if let Some(first) = data.first_mut() {
            *first = match &self.snapshot {
                Some((_, requests)) => requests.0.status.load(Ordering::Acquire),
                None => SNAPSHOT_UNSUPPORTED,
            };
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        match data {
            [BOOT_DONE] => self.boot_done(),
            [SNAPSHOT_REQUEST] => self.snapshot_requested(),
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
    fn other_values_are_ignored_and_reads_say_no_snapshots() {
        let (bus, timer, evt) = rig(Instant::now());
        assert!(bus.write(GUEST_SIGNAL_BASE, &[0x00]));
        assert!(bus.write(GUEST_SIGNAL_BASE, &[0x7f]));
        assert_eq!(timer.boot_time(), None);
        assert_eq!(pending(&evt), 0);

        let mut b = [0u8];
        assert!(bus.read(GUEST_SIGNAL_BASE, &mut b));
        assert_eq!(b, [SNAPSHOT_UNSUPPORTED]);
        // A word-sized access runs past the one-byte port and is not the device's.
        assert!(!bus.write(GUEST_SIGNAL_BASE, &[BOOT_DONE, 0]));
        assert_eq!(timer.boot_time(), None);
    }

    #[test]
    fn port_matches_the_agent() {
        assert_eq!(GUEST_SIGNAL_BASE, 0x440);
    }

    #[test]
    fn snapshot_requests_are_passed_on_one_at_a_time() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let boot = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (mut dev, requests) =
            GuestSignal::new(Instant::now(), boot).with_snapshot_requests(evt.try_clone().unwrap());
        let mut status = [0u8];
        dev.read(0, &mut status);
        assert_eq!(status, [0]);
        dev.write(0, &[SNAPSHOT_REQUEST]);
        dev.write(0, &[SNAPSHOT_REQUEST]); // while pending: ignored
        assert_eq!(pending(&evt), 1);
        requests.complete(true);
        dev.read(0, &mut status);
        assert_eq!(status, [1]);
        dev.write(0, &[SNAPSHOT_REQUEST]);
        assert_eq!(pending(&evt), 1);
        requests.complete(false);
        dev.read(0, &mut status);
        assert_eq!(status, [2 | SNAPSHOT_FAILED]);
        // A device without snapshot requests says "failed" and raises nothing.
        let mut plain = GuestSignal::new(Instant::now(), EventFd::new(libc::EFD_NONBLOCK).unwrap());
        plain.write(0, &[SNAPSHOT_REQUEST]);
        plain.read(0, &mut status);
        assert_eq!(status, [SNAPSHOT_UNSUPPORTED]);
    }
}
