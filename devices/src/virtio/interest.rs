//! Keeping the epoll registrations in step with what the device wants to hear about.
//!
//! Devices watch changing fd sets: vsock connections come and go and change what they wait
//! for (readable when they have credit, writable when bytes wait for the host); net and vsock
//! queue eventfds come with activation and go with reset. After every batch of work the
//! device computes the set it wants and [`Registrations::sync`] applies the difference through [`EpollOps`].
//!
//! A socket that is being closed must leave the epoll set *before* its fd is closed:
//! event-manager keeps its own fd → subscriber map, and an fd closed behind its back would
//! stay there and block the next registration of that fd number. So closed sockets are
//! "retired" first, removed here, and only then dropped.

use std::collections::HashMap;
use std::os::fd::RawFd;

use event_manager::{EventOps, EventSet, Events};
use tracing::warn;

/// The three epoll operations, so that tests can stand in for event-manager's `EventOps`.
pub(crate) trait EpollOps {
    fn add(&mut self, fd: RawFd, set: EventSet) -> Result<(), event_manager::Error>;
    fn modify(&mut self, fd: RawFd, set: EventSet) -> Result<(), event_manager::Error>;
    fn remove(&mut self, fd: RawFd) -> Result<(), event_manager::Error>;
}

impl EpollOps for EventOps<'_> {
    fn add(&mut self, fd: RawFd, set: EventSet) -> Result<(), event_manager::Error> {
        EventOps::add(self, Events::new_raw(fd, set))
    }
    fn modify(&mut self, fd: RawFd, set: EventSet) -> Result<(), event_manager::Error> {
        EventOps::modify(self, Events::new_raw(fd, set))
    }
    fn remove(&mut self, fd: RawFd) -> Result<(), event_manager::Error> {
        EventOps::remove(self, Events::empty_raw(fd))
    }
}

/// The fds the device has registered, with the events each was registered for.
#[derive(Debug, Default)]
pub(crate) struct Registrations {
    registered: HashMap<RawFd, EventSet>,
}

impl Registrations {
    /// Remove `retired` (still open) fds, then make the registrations equal `desired`.
    pub(crate) fn sync(
        &mut self,
        desired: &[(RawFd, EventSet)],
        retired: &[RawFd],
        ops: &mut dyn EpollOps,
    ) {
        for fd in retired {
            if self.registered.remove(fd).is_some() {
                if let Err(e) = ops.remove(*fd) {
                    warn!(fd, "virtio: cannot unregister a closing socket: {e}");
                }
            }
        }
        let want: HashMap<RawFd, EventSet> = desired.iter().copied().collect();
        self.registered.retain(|fd, _| {
            if want.contains_key(fd) {
                return true;
            }
            if let Err(e) = ops.remove(*fd) {
                warn!(fd, "virtio: cannot unregister fd: {e}");
            }
            false
        });
        for (fd, set) in want {
            let result = match self.registered.get(&fd) {
                Some(old) if *old == set => continue,
                Some(_) => ops.modify(fd, set),
                None => ops.add(fd, set),
            };
            match result {
                Ok(()) => {
                    self.registered.insert(fd, set);
                }
                Err(e) => warn!(fd, "virtio: cannot register fd for {set:?}: {e}"),
            }
        }
    }

    /// What `fd` is registered for, if it is.
    #[cfg(test)]
    pub(crate) fn get(&self, fd: RawFd) -> Option<EventSet> {
        self.registered.get(&fd).copied()
    }
}

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod fake {
    use super::*;

    /// An epoll stand-in that enforces what event-manager enforces: no double add, no
    /// modify or remove of an fd that is not registered.
    #[derive(Debug, Default)]
    pub(crate) struct FakeEpoll {
        pub(crate) fds: HashMap<RawFd, EventSet>,
        pub(crate) errors: usize,
    }

    impl EpollOps for FakeEpoll {
        fn add(&mut self, fd: RawFd, set: EventSet) -> Result<(), event_manager::Error> {
            if self.fds.insert(fd, set).is_some() {
                self.errors += 1;
                return Err(event_manager::Error::FdAlreadyRegistered);
            }
            Ok(())
        }
        fn modify(&mut self, fd: RawFd, set: EventSet) -> Result<(), event_manager::Error> {
            match self.fds.get_mut(&fd) {
                Some(s) => {
                    *s = set;
                    Ok(())
                }
                None => {
                    self.errors += 1;
                    Err(event_manager::Error::InvalidId)
                }
            }
        }
        fn remove(&mut self, fd: RawFd) -> Result<(), event_manager::Error> {
            if self.fds.remove(&fd).is_none() {
                self.errors += 1;
                return Err(event_manager::Error::InvalidId);
            }
            Ok(())
        }
    }

    impl FakeEpoll {
        /// The registered fds that are ready now (poll(2) without waiting), each with what
        /// it is ready for: what an event loop would hand the device next.
        pub(crate) fn ready(&self) -> std::io::Result<Vec<(RawFd, EventSet)>> {
            let mut fds: Vec<libc::pollfd> = self
                .fds
                .iter()
                .map(|(fd, set)| libc::pollfd {
                    fd: *fd,
                    events: i16::try_from(set.bits()).unwrap_or(i16::MAX),
                    revents: 0,
                })
                .collect();
            let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
            // SAFETY: `fds` is a valid array of `nfds` pollfd structs for the whole call.
            if unsafe { libc::poll(fds.as_mut_ptr(), nfds, 0) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(fds
                .iter()
                .filter(|p| p.revents != 0)
                .map(|p| {
                    let set = EventSet::from_bits_truncate(u32::from(p.revents.cast_unsigned()));
                    (p.fd, set)
                })
                .collect())
        }
    }

    #[cfg(test)]
    #[test]
    fn sync_applies_the_difference() {
        let mut regs = Registrations::default();
        let mut ep = FakeEpoll::default();
        regs.sync(&[(3, EventSet::IN), (4, EventSet::OUT)], &[], &mut ep);
        regs.sync(
            &[(3, EventSet::IN | EventSet::OUT), (5, EventSet::IN)],
            &[],
            &mut ep,
        );
        assert_eq!(ep.fds.len(), 2);
        assert_eq!(ep.fds[&3], EventSet::IN | EventSet::OUT);
        assert_eq!(ep.fds[&5], EventSet::IN);
        regs.sync(&[(3, EventSet::IN)], &[5], &mut ep);
        assert_eq!(ep.fds.len(), 1);
        assert_eq!(regs.get(3), Some(EventSet::IN));
        assert_eq!(ep.errors, 0);
    }
}
