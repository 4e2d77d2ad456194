//! A device's queues from the driver's DRIVER_OK to its reset, and the event-loop plumbing
//! around them, which every virtio device (block, net, rng, vsock) shares.
//!
//! Activation and reset happen on a vCPU thread (the transport calls the device), which
//! cannot touch the event loop's epoll set: they write the device's wake-up eventfd, and
//! the event loop then brings the registrations in line: new queue eventfds in, retired
//! ones out before they are closed (see [`Registrations`]).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use event_manager::EventSet;
use tracing::warn;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::interest::{EpollOps, Registrations};
use super::state::{restore_queue, QueueRestoreError};
use super::{
    ActivateError, Activation, GuestMemory, QueueRestoreArgs, QueueSnapshot, VirtioInterrupt,
};

/// The `N` queues and what a device needs to use them, from activation to reset.
pub(crate) struct Active<const N: usize> {
    pub(crate) mem: GuestMemory,
    pub(crate) queues: [Queue; N],
    pub(crate) evts: [EventFd; N],
    pub(crate) interrupt: VirtioInterrupt,
}

/// What an fd that became ready is to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ready {
    /// The wake-up eventfd (read): activation, reset or restore happened.
    Wake,
    /// Queue `i`'s notification eventfd (read): the driver kicked it.
    Queue(usize),
    /// Not one of these: the device's own fds (a TAP, a socket).
    Other,
}

/// A device's `N` queues while active, its wake-up eventfd and its epoll registrations.
pub(crate) struct Queues<const N: usize> {
    pub(crate) active: Option<Active<N>>,
    wake_evt: EventFd,
    /// Queue eventfds of a reset device, to unregister before they are closed.
    retired: Vec<EventFd>,
    regs: Registrations,
    /// Names the device in log lines.
    dev: &'static str,
}

impl<const N: usize> Queues<N> {
    pub(crate) fn new(dev: &'static str) -> io::Result<Self> {
        Ok(Self {
            active: None,
            wake_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            retired: Vec::new(),
            regs: Registrations::default(),
            dev,
        })
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active.is_some()
    }

    pub(crate) fn wake_fd(&self) -> RawFd {
        self.wake_evt.as_raw_fd()
    }

    /// Queue `index`'s notification eventfd while active: what a test or fuzzer kicks.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn queue_fd(&self, index: usize) -> Option<RawFd> {
        self.active.as_ref().map(|a| a.evts[index].as_raw_fd())
    }

    /// The driver set DRIVER_OK: go live with exactly `N` queues.
    pub(crate) fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let (queues, evts, mem, interrupt) = activation.exact_queues::<N>()?;
        self.go_live(Active {
            mem,
            queues,
            evts,
            interrupt,
        });
        Ok(())
    }

    /// The driver reset the device: drop the queues (their eventfds leave the epoll set at
    /// the next [`Queues::sync`]).
    pub(crate) fn reset(&mut self) {
        if let Some(a) = self.active.take() {
            self.retired.extend(a.evts);
        }
        self.wake();
    }

    /// The queues' states, for a snapshot: empty while inactive.
    pub(crate) fn save(&self) -> Vec<QueueSnapshot> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| (&q.state()).into()).collect())
            .unwrap_or_default()
    }

    /// Brings back the queues a snapshot holds (none: the device stays inactive), each
    /// checked to be ready and inside guest memory. Kicks that were in flight are gone, so
    /// the event loop is woken to look at the rings once.
    pub(crate) fn restore(
        &mut self,
        saved: &[QueueSnapshot],
        args: QueueRestoreArgs,
    ) -> Result<(), QueueRestoreError> {
        let QueueRestoreArgs {
            mem,
            queue_evts,
            interrupt,
        } = args;
        if saved.is_empty() {
            return Ok(());
        }
        let n = queue_evts.len();
        let (Ok(saved), Ok(evts)) = (
            <&[QueueSnapshot; N]>::try_from(saved),
            <[EventFd; N]>::try_from(queue_evts),
        ) else {
            return Err(QueueRestoreError::Count {
                saved: saved.len(),
                evts: n,
                device: self.dev,
                expected: N,
            });
        };
        let mut queues = Vec::with_capacity(N);
        for (i, q) in saved.iter().enumerate() {
            queues.push(restore_queue(i, q, &mem)?);
        }
        let Ok(queues) = <[Queue; N]>::try_from(queues) else {
            unreachable!("{N} saved queues make {N} queues");
        };
        self.go_live(Active {
            mem,
            queues,
            evts,
            interrupt,
        });
        Ok(())
    }

    /// From now on the device uses `active`; the event loop is woken to register its
    /// queue eventfds.
    fn go_live(&mut self, active: Active<N>) {
        self.active = Some(active);
        self.wake();
    }

    /// What `fd` is to the device; the wake-up and queue eventfds are read (consumed).
    pub(crate) fn ready(&self, fd: RawFd) -> Ready {
        if fd == self.wake_fd() {
            let _ = self.wake_evt.read();
            return Ready::Wake;
        }
        if let Some(a) = &self.active {
            if let Some(i) = a.evts.iter().position(|e| e.as_raw_fd() == fd) {
                let _ = a.evts[i].read();
                return Ready::Queue(i);
            }
        }
        Ready::Other
    }

    /// Brings the epoll registrations in line: the wake-up eventfd always, the queue
    /// eventfds while active, and the device's `own` fds; retired eventfds, and the
    /// device's own fds in `retiring` (still open, about to be closed), leave the set first.
    pub(crate) fn sync(
        &mut self,
        own: &[(RawFd, EventSet)],
        retiring: &[RawFd],
        ops: &mut dyn EpollOps,
    ) {
        let mut desired = vec![(self.wake_fd(), EventSet::IN)];
        desired.extend_from_slice(own);
        if let Some(a) = &self.active {
            desired.extend(a.evts.iter().map(|e| (e.as_raw_fd(), EventSet::IN)));
        }
        let retired = std::mem::take(&mut self.retired);
        let mut fds: Vec<RawFd> = retired.iter().map(AsRawFd::as_raw_fd).collect();
        fds.extend_from_slice(retiring);
        self.regs.sync(&desired, &fds, ops);
        drop(retired);
    }

    /// Writes the wake-up eventfd, so the event loop syncs the registrations.
    pub(crate) fn wake(&self) {
        if let Err(e) = self.wake_evt.write(1) {
            warn!("{}: cannot wake the event loop: {e}", self.dev);
        }
    }
}
