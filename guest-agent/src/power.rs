//! Ending the VM.

use std::io;

/// Flushes file systems and resets the machine. Returns only if the reboot call failed,
/// after reporting it.
pub fn reboot() {
    // SAFETY: sync takes no arguments and only flushes kernel buffers.
    unsafe { libc::sync() };
    // SAFETY: RB_AUTOBOOT restarts the machine; nothing in this process outlives it.
    if unsafe { libc::reboot(libc::RB_AUTOBOOT) } != 0 {
        say!("reboot: {}", io::Error::last_os_error());
    }
}
