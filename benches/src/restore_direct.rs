//! `restore_direct`: `kiln restore` of a hand-made guest's snapshot on the direct path, from
//! the restoring process's start to its first KVM_RUN (the `setup_ms` of its JSON report).
//!
//! The guest is the tiny ELF kernel that spins; it is snapshotted once through `kiln run
//! --api` and `kiln ctl snapshot`, then restored `runs` times, each restore stopped through
//! its own API socket once it serves it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use crate::stats;
use crate::vmm_setup::last_json_line;

/// How long a kiln process may take to serve its API socket.
const SOCKET_WAIT: Duration = Duration::from_secs(30);

pub fn run(kiln: &Path, runs: usize) -> Result<Vec<Value>> {
    let dir = kiln_tests::tmp::TempDir::new("bench-restore-direct")?;
    let kernel = dir.path().join("spin.elf");
    std::fs::write(
        &kernel,
        kiln_tests::tiny_kernel::build_with("", kiln_tests::tiny_kernel::End::Spin),
    )?;
    let snapshot = dir.path().join("snap");
    take_snapshot(kiln, &kernel, dir.path(), &snapshot)?;
    let memory_bytes = std::fs::metadata(snapshot.join("memory"))?.len();

    let mut setup = Vec::with_capacity(runs);
    for i in 0..runs {
        let api = dir.path().join(format!("restore-{i}.sock"));
        let child = Command::new(kiln)
            .args(["restore", "--serial", "null", "--json", "--snapshot"])
            .arg(&snapshot)
            .arg("--api")
            .arg(&api)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kiln restore")?;
        let child = Stopper(Some(child));
        wait_for_socket(&api)?;
        ctl(kiln, &api, "shutdown")?;
        let out = child.finish()?;
        if !out.status.success() {
            bail!(
                "kiln restore failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let report = last_json_line(&String::from_utf8_lossy(&out.stdout))?;
        setup.push(
            report["setup_ms"]
                .as_f64()
                .context("no setup_ms in kiln restore's report")?,
        );
    }
    let mut extra = Map::new();
    extra.insert(
        "guest".into(),
        "tiny ELF kernel (spinning), 1 vCPU, 128 MiB".into(),
    );
    extra.insert("memory_file_bytes".into(), memory_bytes.into());
    Ok(vec![stats::result(
        "restore_direct",
        "direct",
        "ms",
        &setup,
        extra,
    )])
}

/// Boots the spinning guest with an API socket, snapshots it into `snapshot`, stops it.
fn take_snapshot(kiln: &Path, kernel: &Path, dir: &Path, snapshot: &Path) -> Result<()> {
    let api = dir.join("original.sock");
    let child = Command::new(kiln)
        .args(["run", "--memory", "128", "--serial", "null", "--kernel"])
        .arg(kernel)
        .arg("--api")
        .arg(&api)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting kiln run")?;
    let child = Stopper(Some(child));
    wait_for_socket(&api)?;
    let snapshot_arg = snapshot.to_str().context("non-UTF-8 scratch path")?;
    ctl(kiln, &api, &format!("snapshot --dir {snapshot_arg}"))?;
    ctl(kiln, &api, "shutdown")?;
    let out = child.finish()?;
    if !out.status.success() {
        bail!(
            "the VM to snapshot failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn ctl(kiln: &Path, api: &Path, request: &str) -> Result<()> {
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
fn wait_for_socket(path: &Path) -> Result<()> {
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
struct Stopper(Option<Child>);

impl Stopper {
    fn finish(mut self) -> Result<std::process::Output> {
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
