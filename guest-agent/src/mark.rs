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

/// Reads the status byte of [`SIGNAL_PORT`] (access must have been granted by [`signal`]).
#[cfg(target_arch = "x86_64")]
fn status() -> u8 {
    let value: u8;
    // SAFETY: the caller has I/O permission for the port (granted in `signal`); the read
    // goes to the VMM's signal device and touches no memory of this process.
    unsafe {
        core::arch::asm!(
            "in al, dx",
            in("dx") SIGNAL_PORT,
            out("al") value,
            options(nomem, nostack, preserves_flags)
        );
    }
    value
}

/// `kiln-snapshot`, run by a job inside the guest: asks the VMM for a snapshot of the VM
/// now and waits until it has been written. The request only queues the work (the vCPU
/// goes on), so this polls the port's status byte, whose count moves when the VMM is done
/// (a device register read: the VMM pauses the whole VM for the snapshot, so few polls
/// happen). Returns the exit code: 0 done, 1 failed, refused or timed out.
#[cfg(target_arch = "x86_64")]
pub fn request_snapshot() -> i32 {
    use kiln_agent::marks::{SNAPSHOT_FAILED, SNAPSHOT_REQUEST, SNAPSHOT_UNSUPPORTED};
    const WAIT: std::time::Duration = std::time::Duration::from_secs(120);
    // SAFETY: ioperm changes only this process's I/O permission bitmap.
    if unsafe { libc::ioperm(libc::c_ulong::from(SIGNAL_PORT), 1, 1) } != 0 {
        eprintln!(
            "kiln-snapshot: cannot reach the VMM's signal port: {}",
            io::Error::last_os_error()
        );
        return 1;
    }
    let before = status();
    if before == SNAPSHOT_UNSUPPORTED {
        eprintln!("kiln-snapshot: this VM takes no snapshots on request (kiln job --snapshot-at)");
        return 1;
    }
    if let Err(e) = signal(SNAPSHOT_REQUEST) {
        eprintln!("kiln-snapshot: cannot signal the VMM: {e}");
        return 1;
    }
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        let now = status();
        if now & !SNAPSHOT_FAILED != before & !SNAPSHOT_FAILED {
            if now & SNAPSHOT_FAILED != 0 {
                eprintln!("kiln-snapshot: the VMM could not take the snapshot (see kiln's log)");
                return 1;
            }
            println!("kiln-snapshot: snapshot taken");
            return 0;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    eprintln!(
        "kiln-snapshot: no answer from the VMM within {} s",
        WAIT.as_secs()
    );
    1
}
