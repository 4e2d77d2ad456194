//! `restore_direct`: `kiln restore` of a hand-made guest's snapshot on the direct path, from
//! the restoring process's start to its first KVM_RUN (the `setup_ms` of its JSON report).
//!
//! The guest is the tiny ELF kernel that spins; it is snapshotted once through `kiln run
//! --api` and `kiln ctl snapshot`, then restored `runs` times, each restore stopped through
//! its own API socket once it serves it.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use crate::kiln_process::{ctl, spin_kernel, start_spinning_vm, wait_for_socket, Stopper};
use crate::stats;
use crate::vmm_setup::last_json_line;

pub fn run(kiln: &Path, runs: usize) -> Result<Vec<Value>> {
    let dir = kiln_tests::tmp::TempDir::new("bench-restore-direct")?;
    let kernel = spin_kernel(dir.path())?;
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
        let child = Stopper::new(child);
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
    let child = start_spinning_vm(kiln, kernel, &api)?;
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
