//! Snapshots through the CLI on the direct path: a spinning tiny guest is snapshotted with
//! `kiln run --api` + `kiln ctl snapshot`; damaged copies of that snapshot are refused by
//! `kiln restore` with one clear error line and left byte-for-byte as they were, and the
//! intact one restores and answers on its own API socket.

mod util;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Stdio;

use util::vm::*;
use util::*;

/// `kiln restore --snapshot DIR` must fail cleanly and leave DIR (and the shared snapshot)
/// unchanged. Returns the error line.
fn restore_refused(dir: &Path) -> String {
    let before = dir.exists().then(|| digest(dir));
    let base = digest(snapshot());
    let line = fails(
        kiln()
            .args(["restore", "--serial", "null", "--snapshot"])
            .arg(dir),
    );
    if let Some(before) = before {
        assert_eq!(
            digest(dir),
            before,
            "kiln restore changed {}",
            dir.display()
        );
    }
    assert_eq!(digest(snapshot()), base, "the shared snapshot changed");
    line
}

#[test]
fn truncated_memory_file_is_refused() {
    let dir = snapshot_copy("truncated");
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("memory"))
        .unwrap();
    let len = memory.metadata().unwrap().len();
    memory.set_len(len / 2).unwrap();
    drop(memory);
    let line = restore_refused(&dir);
    assert!(
        line.contains("memory") && line.contains(&format!("{} bytes", len / 2)),
        "{line}"
    );
    assert!(line.contains(&format!("{len} bytes of memory")), "{line}");
}

#[test]
fn flipped_state_byte_is_refused() {
    let dir = snapshot_copy("flipped");
    let path = dir.join("state");
    let mut bytes = std::fs::read(&path).unwrap();
    let i = bytes.len() - 100;
    bytes[i] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let line = restore_refused(&dir);
    assert!(
        line.contains("corrupt") && line.contains("checksum mismatch"),
        "{line}"
    );
    assert!(line.contains(path.to_str().unwrap()), "{line}");
}

#[test]
fn version_mismatch_is_refused() {
    let dir = snapshot_copy("version");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("state"))
        .unwrap();
    // A version this kiln does not read: the next one.
    let other = kiln::snapshot::FORMAT_VERSION + 1;
    file.seek(SeekFrom::Start(8)).unwrap();
    file.write_all(&other.to_le_bytes()).unwrap();
    drop(file);
    let line = restore_refused(&dir);
    assert!(
        line.contains(&format!("format version {other}"))
            && line.contains(&format!("reads version {}", kiln::snapshot::FORMAT_VERSION)),
        "{line}"
    );
}

#[test]
fn missing_snapshot_dir_is_refused() {
    let dir = scratch("missing").join("no-such-snapshot");
    let line = restore_refused(&dir);
    assert!(
        line.contains("no-such-snapshot") && line.contains("No such file"),
        "{line}"
    );
    // kiln fork checks the same before starting any clone.
    let line = fails(
        kiln()
            .args(["fork", "--count", "2", "--snapshot"])
            .arg(&dir),
    );
    assert!(line.contains("no-such-snapshot"), "{line}");
    assert!(!dir.exists());
}

#[test]
fn snapshot_into_a_dir_holding_a_snapshot_is_refused() {
    let dir = snapshot_copy("exists");
    let before = digest(&dir);
    let vm = RunningVm::start(dir.parent().unwrap());
    let out = ctl(&vm.api, &["snapshot", "--dir", dir.to_str().unwrap()]);
    let line = one_error_line("kiln ctl snapshot", &out);
    assert!(line.contains("already holds a snapshot"), "{line}");
    let response: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(response["ok"], false, "{response}");
    assert_eq!(
        digest(&dir),
        before,
        "the existing snapshot was written over"
    );
    // The refused snapshot left the VM running.
    assert_eq!(ctl_ok(&vm.api, &["status"])["state"], "running");
    assert_eq!(vm.terminate().code(), Some(128 + libc::SIGTERM));
}

#[test]
fn ctl_without_a_vm_fails_cleanly() {
    let api = scratch("noapi").join("api.sock");
    let line = one_error_line("kiln ctl", &ctl(&api, &["status"]));
    assert!(
        line.contains("cannot reach") && line.contains("api.sock"),
        "{line}"
    );
}

#[test]
fn restore_runs_and_answers_on_its_api() {
    let base = digest(snapshot());
    let dir = scratch("restore");
    let api = dir.join("restored.sock");
    let mut restored = Guard::new(
        kiln()
            .args(["restore", "--json", "--snapshot"])
            .arg(snapshot())
            .arg("--api")
            .arg(&api)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    assert!(
        wait_answering(&api, &mut restored.child),
        "restored VM never answered"
    );
    let status = ctl_ok(&api, &["status"]);
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["memory_mib"], 32, "{status}");
    assert_eq!(ctl_ok(&api, &["pause"])["state"], "paused");
    assert_eq!(ctl_ok(&api, &["status"])["state"], "paused");
    assert_eq!(ctl_ok(&api, &["resume"])["state"], "running");
    assert_eq!(ctl_ok(&api, &["status"])["state"], "running");
    assert!(
        matches!(restored.child.try_wait(), Ok(None)),
        "the restored VM ended early"
    );

    signal(&restored.child, libc::SIGTERM);
    let (status, stdout, stderr) = restored.finish();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["result"], "stopped", "{report}");
    assert!(!api.exists(), "the API socket was removed");
    assert_eq!(digest(snapshot()), base, "restoring changed the snapshot");
}

#[test]
fn vsock_snapshots_need_their_own_vsock_path() {
    let dir = scratch("vsock");
    let vsock = dir.join("vsock.sock");
    let mut vm = RunningVm::start_with(&dir, &["--vsock", vsock.to_str().unwrap()]);
    let snap = dir.join("snap");
    ctl_ok(&vm.api, &["snapshot", "--dir", snap.to_str().unwrap()]);
    ctl_ok(&vm.api, &["shutdown"]);
    assert_eq!(vm.process.wait().code(), Some(0));

    let line = restore_refused(&snap);
    assert!(
        line.contains("give this clone its own --vsock path"),
        "{line}"
    );
    let line = fails(
        kiln()
            .args(["fork", "--count", "2", "--snapshot"])
            .arg(&snap),
    );
    assert!(line.contains("--vsock-prefix"), "{line}");

    // The other way round: a snapshot without vsock refuses a --vsock path.
    let line = fails(
        kiln()
            .args(["restore", "--serial", "null", "--snapshot"])
            .arg(snapshot())
            .arg("--vsock")
            .arg(dir.join("unused.sock")),
    );
    assert!(line.contains("has no vsock device"), "{line}");

    // With its own path, the clone runs and its vsock socket goes with it.
    let clone_vsock = dir.join("clone.sock");
    let api = dir.join("clone.api");
    let mut restored = Guard::new(
        kiln()
            .args(["restore", "--serial", "null", "--snapshot"])
            .arg(&snap)
            .arg("--vsock")
            .arg(&clone_vsock)
            .arg("--api")
            .arg(&api)
            .spawn()
            .unwrap(),
    );
    assert!(wait_answering(&api, &mut restored.child));
    assert!(clone_vsock.exists(), "the clone's vsock socket");
    assert_eq!(restored.terminate().code(), Some(128 + libc::SIGTERM));
    assert!(!clone_vsock.exists() && !api.exists(), "sockets removed");
}
