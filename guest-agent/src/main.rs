//! `kiln-agent`: PID 1 of a kiln guest.
//!
//! It mounts the basic file systems, marks boot done on the guest-signal port, runs
//! `/etc/kiln/rc` if the image has one (reaping every other child meanwhile, as PID 1 must),
//! then syncs and reboots, which ends the VM (the guest kernel runs with `reboot=k`).
//!
//! It never panics on purpose: each failure is printed as `kiln-agent: <what>: <error>` and
//! the agent goes on where that makes sense.
//!
//! `#![no_main]`: Rust's usual start-up code reopens closed standard descriptors on
//! `/dev/null` and aborts when that file is missing. In a bare initramfs neither
//! `/dev/console` nor `/dev/null` need exist before `/dev` is mounted, so PID 1 would die
//! before `main`. The agent therefore provides the C `main` itself and repairs its standard
//! descriptors once devtmpfs is mounted (see [`init::console_stdio`]).
#![no_main]

use std::ffi::{c_char, c_int};

/// Prints `kiln-agent: <message>` on stderr (the console), ignoring write errors: there is
/// nowhere else to report them.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "kiln-agent: {}", format_args!($($arg)*));
    }};
}

mod init;
mod mark;
mod power;
mod rc;

/// The job script the image may carry; run with `/bin/sh`.
const RC_PATH: &str = "/etc/kiln/rc";

/// The C entry point (see the crate docs for why it is not Rust's `main`).
#[unsafe(no_mangle)]
pub extern "C" fn main(_argc: c_int, _argv: *const *const c_char) -> c_int {
    if std::process::id() != 1 {
        // Mounting over /proc and rebooting are only right for a guest's init.
        say!("not running as PID 1; refusing to start (this program is a guest's /init)");
        return 2;
    }
    init::setup();
    if let Err(e) = mark::signal(kiln_agent::marks::BOOT_DONE) {
        say!("marking boot done: {e}");
    }
    rc::run(RC_PATH);
    power::reboot();
    // Reboot failed (already reported). Exiting makes the kernel panic, which with
    // `panic=-1` resets the VM: a clear end instead of a guest that hangs.
    1
}
