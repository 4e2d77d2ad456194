//! Marks to the VMM on the guest-signal port (`kiln_agent::marks`).

use std::io;

use kiln_agent::marks::SIGNAL_PORT;

/// Writes `value` to [`SIGNAL_PORT`], asking the kernel for access to the port first.
#[cfg(target_arch = "x86_64")]
pub fn signal(value: u8) -> io::Result<()> {
    // SAFETY: ioperm changes only this process's I/O permission bitmap.
    if unsafe { libc::ioperm(libc::c_ulong::from(SIGNAL_PORT), 1, 1) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: access to the port was granted above; the write goes to the VMM's signal
    // device and touches no memory of this process.
    unsafe {
        core::arch::asm!(
            "out dx, al",
            in("dx") SIGNAL_PORT,
            in("al") value,
            options(nomem, nostack, preserves_flags)
        );
    }
    Ok(())
}

/// Port I/O exists only on x86.
#[cfg(not(target_arch = "x86_64"))]
pub fn signal(_value: u8) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "the guest-signal port needs x86 port I/O",
    ))
}
