//! `kiln-agent`: PID 1 of a kiln guest.
//!
//! It mounts the basic file systems, sets up what a CI machine has (cgroups, rlimits,
//! loopback; [`machine`]), starts the reaper (PID 1 collects every orphan), listens
//! on vsock port [`AGENT_PORT`], and only then marks boot done on the guest-signal port:
//! "boot done" means "ready for work". Then:
//!
//! - if the image has `/etc/kiln/rc`, it runs it (serving vsock meanwhile), then syncs and
//!   reboots, which ends the VM (the guest kernel runs with `reboot=k`);
//! - otherwise, if the VM has a vsock device, it serves requests ([`kiln_agent::server`])
//!   until one asks it to shut down; without a device there is nothing to do, and it
//!   reboots at once, silently.
//!
//! It never panics on purpose: each failure is printed as `kiln-agent: <what>: <error>` and
//! the agent goes on where that makes sense; a bad frame closes only its connection.
//!
//! `#![no_main]`: Rust's usual start-up code reopens closed standard descriptors on
//! `/dev/null` and aborts when that file is missing. In a bare initramfs neither
//! `/dev/console` nor `/dev/null` need exist before `/dev` is mounted, so PID 1 would die
//! before `main`. The agent therefore provides the C `main` itself and repairs its standard
//! descriptors once devtmpfs is mounted (see [`init::console_stdio`]).
#![no_main]

#[macro_use]
extern crate kiln_agent;

use std::ffi::{c_char, c_int};
use std::path::Path;
use std::thread;

use kiln_agent::protocol::AGENT_PORT;
use kiln_agent::server::reaper::Reaper;
use kiln_agent::server::Server;

mod init;
mod machine;
mod mark;
mod net;
mod power;
mod rc;
mod system;
mod vsock;

/// The job script the image may carry; run with `/bin/sh`.
const RC_PATH: &str = "/etc/kiln/rc";

/// The C entry point (see the crate docs for why it is not Rust's `main`).
#[unsafe(no_mangle)]
pub extern "C" fn main(_argc: c_int, _argv: *const *const c_char) -> c_int {
    // Run as `kiln-snapshot` (a link to this binary), it is the job's snapshot helper.
    let name = std::env::args_os().next().unwrap_or_default();
    if Path::new(&name).file_name() == Some(std::ffi::OsStr::new("kiln-snapshot")) {
        return mark::request_snapshot();
    }
    // Run by the host after a restore (`/proc/1/exe net-refresh MAC`): the clone's new MAC.
    let mut args = std::env::args_os().skip(1);
    if std::process::id() != 1
        && args.next().as_deref() == Some(std::ffi::OsStr::new("net-refresh"))
    {
        return net::refresh(args.next().as_deref());
    }
    // Run by the host before a job that wants Docker (`/proc/1/exe docker-start`).
    if std::process::id() != 1
        && std::env::args_os().nth(1).as_deref()
            == Some(std::ffi::OsStr::new(kiln_agent::docker::SUBCOMMAND))
    {
        return docker_start();
    }
    if std::process::id() != 1 {
        // Mounting over /proc and rebooting are only right for a guest's init.
        say!("not running as PID 1; refusing to start (this program is a guest's /init)");
        return 2;
    }
    init::setup();
    machine::setup(init::HOSTNAME);
    // Before boot done: a job may use the network from its first line.
    let _ = net::setup();
    // Writes to a closed connection or pipe must fail with EPIPE, not kill the agent.
    // SAFETY: setting a signal's disposition to "ignore" installs no handler code.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    Reaper::global();
    // Listening costs nothing, so the agent listens whenever vsock exists (loopback
    // included); whether it waits for work without an rc script depends on a real device.
    let device = vsock::device_present();
    let listener = match vsock::listen(AGENT_PORT) {
        Ok(listener) => Some(listener),
        Err(e) => {
            if device {
                say!("listening on vsock port {AGENT_PORT}: {e}; the host cannot send work");
            }
            None
        }
    };
    if let Err(e) = mark::signal(kiln_agent::marks::BOOT_DONE) {
        say!("marking boot done: {e}");
    }
    let server = Server::new(system::Guest);
    if Path::new(RC_PATH).exists() {
        if let Some(listener) = listener {
            let spawned = thread::Builder::new()
                .name("vsock".into())
                .spawn(move || vsock::serve(&listener, &server));
            if let Err(e) = spawned {
                say!("starting the vsock server thread: {e}");
            }
        }
        rc::run(RC_PATH);
    } else if let Some(listener) = listener.filter(|_| device) {
        vsock::serve(&listener, &server);
    }
    say!("reboot: {}", power::reboot());
    // Reboot failed. Exiting makes the kernel panic, which with `panic=-1` resets the VM:
    // a clear end instead of a guest that hangs.
    1
}

/// `docker-start [--if-installed] [--timeout SECS]`: starts `dockerd` and prints its
/// [`kiln_agent::docker::Report`]; one error line and a non-zero exit code if it cannot.
fn docker_start() -> c_int {
    use kiln_agent::docker::{self, DockerError, Options};
    let opts = match Options::parse(std::env::args().skip(2)) {
        Ok(opts) => opts,
        Err(e) => {
            say!("{}: {e}", docker::SUBCOMMAND);
            return 2;
        }
    };
    match docker::start(&opts) {
        Ok(report) => {
            println!("{report}");
            0
        }
        Err(e) => {
            say!("docker: {e}");
            match e {
                DockerError::NotInstalled => docker::EXIT_NOT_INSTALLED,
                _ => 1,
            }
        }
    }
}
