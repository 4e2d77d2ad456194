//! Runs the image's job script and reaps children meanwhile.

use std::io;
use std::path::Path;
use std::process::Command;

/// The environment the script gets (the kernel hands init only HOME=/ and TERM=linux).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs `/bin/sh <path>` if `path` exists, with stdio on the console, and waits for it
/// while reaping every other child that ends meanwhile. Reports how the script ended.
pub fn run(path: &str) {
    if !Path::new(path).exists() {
        return;
    }
    let pid = match spawn(path) {
        Ok(pid) => pid,
        Err(e) => {
            say!("running /bin/sh {path}: {e}");
            return;
        }
    };
    match wait_reaping(pid) {
        Ok(status) => say!("rc {}", describe(status)),
        Err(e) => say!("waiting for {path}: {e}"),
    }
}

fn spawn(path: &str) -> io::Result<libc::pid_t> {
    let child = Command::new("/bin/sh")
        .arg(path)
        .env("PATH", PATH)
        .env("HOME", "/root")
        .current_dir("/")
        .spawn()?;
    // The std handle is dropped without waiting: `wait_reaping` collects the status.
    libc::pid_t::try_from(child.id()).map_err(io::Error::other)
}

/// Waits for any child until `pid` ends; returns its wait status.
fn wait_reaping(pid: libc::pid_t) -> io::Result<libc::c_int> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes only to `status`, which lives across the call.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r == pid {
            return Ok(status);
        }
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        // Any other pid: an orphan re-parented to init, now reaped.
    }
}

fn describe(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("ended with wait status {status:#x}")
    }
}
