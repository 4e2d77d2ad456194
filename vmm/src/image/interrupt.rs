//! Interrupting a build: SIGINT, SIGTERM or SIGHUP must not kill kiln outright, or the
//! staging directory would stay behind (and debootstrap's mounts in it). Instead the signal
//! is passed to the running tool, the build stops at its next step with an error, and the
//! staging directory is removed on the way out.

use std::sync::atomic::{AtomicI32, Ordering};

use super::ImageError;

/// The pid of the tool being waited for, 0 when none.
static CHILD: AtomicI32 = AtomicI32::new(0);
/// The signal that interrupted the build, 0 while none has.
static INTERRUPTED: AtomicI32 = AtomicI32::new(0);

/// Starts catching the signals for the rest of the process (a `kiln image` command). The
/// handler itself records the signal and passes it on, so that both have happened by the
/// time the interrupted thread runs on.
pub fn install() -> Result<(), ImageError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    for signo in [SIGINT, SIGTERM, SIGHUP] {
        // SAFETY: the handler does only async-signal-safe things: atomic loads and stores
        // and kill(2).
        unsafe { signal_hook::low_level::register(signo, move || on_signal(signo)) }
            .map_err(ImageError::Signals)?;
    }
    Ok(())
}

fn on_signal(signo: i32) {
    INTERRUPTED.store(signo, Ordering::SeqCst);
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill only sends a signal; `pid` is our child, not yet reaped (CHILD is
        // cleared right after the wait that reaps it).
        unsafe { libc::kill(pid, signo) };
    }
}

/// Fails if a signal has interrupted the build.
pub(crate) fn check() -> Result<(), ImageError> {
    match INTERRUPTED.load(Ordering::SeqCst) {
        0 => Ok(()),
        signo => Err(ImageError::Interrupted(signo)),
    }
}

/// Runs `cmd` to its end with interrupts forwarded to it.
pub(crate) fn wait_for(
    cmd: &mut std::process::Command,
) -> std::io::Result<std::process::ExitStatus> {
    let mut child = cmd.spawn()?;
    CHILD.store(i32::try_from(child.id()).unwrap_or(0), Ordering::SeqCst);
    let status = child.wait();
    CHILD.store(0, Ordering::SeqCst);
    status
}
