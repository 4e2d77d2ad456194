//! Driving `kiln` processes from a benchmark: waiting for an API socket, `kiln ctl`
//! requests, and a guard that kills a process a failed run leaves behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a kiln process may take to serve its API socket.
const SOCKET_WAIT: Duration = Duration::from_secs(30);

/// Writes the tiny ELF kernel that spins forever into `dir`; returns its path.
pub fn spin_kernel(dir: &Path) -> Result<PathBuf> {
    let kernel = dir.join("spin.elf");
    std::fs::write(
        &kernel,
        kiln_tests::tiny_kernel::build_with("", kiln_tests::tiny_kernel::End::Spin),
    )?;
    Ok(kernel)
}

/// Starts `kiln run` of `kernel` (128 MiB, console discarded) serving its control API on
/// `api`, and waits until the socket is there.
pub fn start_spinning_vm(kiln: &Path, kernel: &Path, api: &Path) -> Result<Stopper> {
    let child = Command::new(kiln)
        .args(["run", "--memory", "128", "--serial", "null", "--kernel"])
        .arg(kernel)
        .arg("--api")
        .arg(api)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting kiln run")?;
    let child = Stopper::new(child);
    wait_for_socket(api)?;
    Ok(child)
}

pub fn ctl(kiln: &Path, api: &Path, request: &str) -> Result<()> {
    let out = Command::new(kiln)
        .arg("ctl")
        .arg("--api")
        .arg(api)
        .args(request.split(' '))
        .output()
        .context("running kiln ctl")?;
    if !out.status.success() {
        bail!(
            "kiln ctl {request}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Waits until `path` exists (kiln binds its API socket before it runs the VM).
pub fn wait_for_socket(path: &Path) -> Result<()> {
    let deadline = Instant::now() + SOCKET_WAIT;
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{} did not appear within {SOCKET_WAIT:?}", path.display());
        }
        // Polling for a file that has no other notification; bounded by the deadline.
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// A kiln process killed if it is still running when dropped, so that a failed run leaves
/// no spinning VM behind.
pub struct Stopper(Option<Child>);

impl Stopper {
    pub fn new(child: Child) -> Self {
        Stopper(Some(child))
    }

    /// The process's pid.
    pub fn id(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    /// Waits for the process to end and collects its output.
    pub fn finish(mut self) -> Result<std::process::Output> {
        let child = self.0.take().context("process already collected")?;
        Ok(child.wait_with_output()?)
    }
}

impl Drop for Stopper {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
