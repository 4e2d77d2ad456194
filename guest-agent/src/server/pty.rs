//! Pseudo-terminals for execs that ask for one (`tty` in the request).
//!
//! The master comes from `/dev/ptmx` and the slave straight from it (`TIOCGPTPEER`), so no
//! `/dev/pts/N` path is looked up; both are close-on-exec, and the slave is opened without
//! becoming anyone's controlling terminal (the child takes it with `TIOCSCTTY`).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::protocol::WindowSize;

/// A new pseudo-terminal of `size`: `(master, slave)`.
pub(super) fn open(size: WindowSize) -> io::Result<(File, OwnedFd)> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: open takes a NUL-terminated path; the descriptor is owned below.
    let master = unsafe { libc::open(c"/dev/ptmx".as_ptr(), flags) };
    if master < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("opening /dev/ptmx: {e}")));
    }
    // SAFETY: `master` was just opened and nothing else owns it.
    let master = unsafe { File::from_raw_fd(master) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int, which lives across the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(with_what("unlocking the terminal"));
    }
    set_size(&master, size)?;
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new descriptor.
    let slave = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if slave < 0 {
        return Err(with_what("opening the terminal's slave"));
    }
    // SAFETY: `slave` was just created and nothing else owns it.
    Ok((master, unsafe { OwnedFd::from_raw_fd(slave) }))
}

/// Sets the terminal's size; the kernel sends SIGWINCH to its foreground process group.
pub(super) fn set_size(master: &File, size: WindowSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize, which lives across the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(with_what("setting the terminal size"));
    }
    Ok(())
}

/// The terminal's foreground process group, if it has one.
pub(super) fn foreground(master: &File) -> Option<libc::pid_t> {
    let mut pgrp: libc::pid_t = 0;
    // SAFETY: TIOCGPGRP writes one pid_t, which lives across the call. On a master it
    // answers for the slave.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPGRP, &mut pgrp) };
    (r == 0 && pgrp > 0).then_some(pgrp)
}

fn with_what(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}
