//! The outer `kiln jail` process's signals: held back while it sets up, then passed on to
//! the jailed kiln once that one handles them.

use super::JailError;

/// SIGINT and SIGTERM blocked in this thread; the previous mask comes back when dropped.
pub(super) struct SignalMask(libc::sigset_t);

impl SignalMask {
    pub(super) fn block() -> SignalMask {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        let mut old = set;
        // SAFETY: set and old are valid sigset_t values we own.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        }
        SignalMask(old)
    }

    pub(super) fn restore(&self) {
        // SAFETY: self.0 is the mask pthread_sigmask gave back.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

impl Drop for SignalMask {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Waits (up to 10 s) until the jailed kiln catches or blocks `sig`, as its
/// `/proc/<pid>/status` says: PID 1 of a namespace drops a signal it does not handle, and
/// the inner kiln installs its handlers only a moment after it starts.
fn wait_until_handled(pid: libc::pid_t, sig: libc::c_int) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let bit = 1u64 << (sig - 1);
    let status = format!("/proc/{pid}/status");
    while std::time::Instant::now() < deadline {
        let Ok(text) = std::fs::read_to_string(&status) else {
            return;
        };
        let mask = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        };
        match (mask("SigCgt:"), mask("SigBlk:")) {
            (Some(caught), Some(blocked)) if (caught | blocked) & bit != 0 => return,
            (Some(_), Some(_)) => std::thread::sleep(std::time::Duration::from_millis(10)),
            _ => return, // a zombie, or no /proc: send it anyway
        }
    }
}

/// Passes SIGINT and SIGTERM on to the jailed kiln, from a thread, for as long as this
/// process lives.
pub(super) fn forward_signals(pid: libc::pid_t) -> Result<(), JailError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| JailError::Sys("install the SIGINT/SIGTERM handlers", e))?;
    std::thread::Builder::new()
        .name("jail-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                wait_until_handled(pid, sig);
                // SAFETY: kill takes no pointers; pid is our child (reaped only when this
                // process is about to exit).
                unsafe { libc::kill(pid, sig) };
            }
        })
        .map_err(|e| JailError::Sys("start the signal thread", e))?;
    Ok(())
}
