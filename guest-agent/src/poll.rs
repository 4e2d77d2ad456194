//! Waiting until descriptors can be read, as the agent's output pump and the client's
//! keystroke feeder both do.

use std::io;
use std::os::fd::RawFd;

/// Waits, without a time limit, until one of `fds` (-1 for a slot not in use) is readable
/// or hung up; returns for each whether it is. A wait a signal interrupts is resumed.
pub(crate) fn readable<const N: usize>(fds: [RawFd; N]) -> io::Result<[bool; N]> {
    let mut polled = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let count = libc::nfds_t::try_from(N).map_err(|_| io::ErrorKind::InvalidInput)?;
    loop {
        // SAFETY: `polled` is an array of N pollfds that lives across the call.
        if unsafe { libc::poll(polled.as_mut_ptr(), count, -1) } >= 0 {
            return Ok(polled.map(|p| p.revents != 0));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
