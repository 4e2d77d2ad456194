//! Ending the VM.

use std::io;

/// Flushes file systems and resets the machine. Returns only if the reboot call failed,
/// with why.
pub fn reboot() -> io::Error {
    // SAFETY: sync takes no arguments and only flushes kernel buffers.
    unsafe { libc::sync() };
    // SAFETY: RB_AUTOBOOT restarts the machine; nothing in this process outlives it.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    io::Error::last_os_error()
}
