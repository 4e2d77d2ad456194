//! What kiln leaves on the host is private, and what a snapshot names is confined: a
//! spinning tiny guest under `kiln run` has its API socket, vsock socket, serial file and
//! snapshot readable and writable by its user only (or its socket group when given one);
//! a crafted or tampered snapshot (a host file named as a disk, a planted symbolic link, a
//! machine with no vCPUs or absurd memory) is refused by `kiln restore` with one line.

mod util;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use kiln::device_manager::{DiskState, MmioWindow, VirtioDeviceState, VirtioState};
use kiln::snapshot::{read_state, write_state, SnapshotState};
use kiln_devices::virtio::block::{BackendState, BlockConfigState, BlockState, SERIAL_LEN};
use kiln_devices::virtio::MmioTransportState;
use util::vm::*;
use util::*;

/// `path`'s permission bits, not following a link.
fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// `kiln restore` of `dir` fails with one error line, which is returned.
fn restore_refused(dir: &Path) -> String {
    fails(
        kiln()
            .args(["restore", "--serial", "null", "--snapshot"])
            .arg(dir),
    )
}

/// A snapshot directory `name` holding `state` and a copy of the shared snapshot's memory.
fn crafted(name: &str, state: &SnapshotState) -> PathBuf {
    let dir = scratch(name).join("snap");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(snapshot().join("memory"), dir.join("memory")).unwrap();
    write_state(&dir, state).unwrap();
    dir
}

/// A read-only or writable raw disk at `path`, as a snapshot would record it, at the
/// `index`th MMIO window.
fn raw_disk(path: &Path, read_only: bool, index: usize) -> VirtioDeviceState {
    VirtioDeviceState {
        window: MmioWindow::nth(index).unwrap(),
        transport: MmioTransportState::default(),
        device: VirtioState::Block(DiskState {
            device: BlockState {
                version: kiln_devices::virtio::block::BLOCK_STATE_VERSION,
                acked_features: 0,
                config: BlockConfigState {
                    capacity: 8,
                    read_only,
                    device_features: 0,
                },
                serial: [0; SERIAL_LEN],
                backend: BackendState::Raw {
                    path: path.to_owned(),
                    read_only,
                },
                queues: Vec::new(),
            },
            overlay_file: None,
            image_mtime: kiln::snapshot::image_mtime(path).unwrap_or((0, 0)),
        }),
    }
}

#[test]
fn hostile_restore_refuses_a_host_file_named_as_a_disk() {
    for (name, read_only, says) in [
        ("shadow-ro", true, "outside the snapshot directory"),
        ("shadow-rw", false, "writable raw image"),
    ] {
        let mut state = read_state(snapshot()).unwrap();
        let next = state.devices.virtio.len();
        state
            .devices
            .virtio
            .push(raw_disk(Path::new("/etc/shadow"), read_only, next));
        let dir = crafted(name, &state);
        let line = restore_refused(&dir);
        assert!(line.contains(says), "{line}");
        if read_only {
            assert!(
                line.contains("/etc/shadow") && line.contains("--disk-image 0="),
                "{line}"
            );
        }
    }
}

#[test]
fn hostile_restore_does_not_follow_planted_symlinks() {
    for file in ["memory", "state"] {
        let dir = snapshot_copy(&format!("link-{file}"));
        // The link points at the intact file: only the link itself is wrong.
        std::fs::remove_file(dir.join(file)).unwrap();
        std::os::unix::fs::symlink(snapshot().join(file), dir.join(file)).unwrap();
        let line = restore_refused(&dir);
        assert!(
            line.contains("symbolic link") && line.contains(file),
            "{file}: {line}"
        );
    }
}

#[test]
fn hostile_restore_refuses_zero_vcpus_and_huge_memory() {
    let mut state = read_state(snapshot()).unwrap();
    state.machine.vcpus = 0;
    state.vcpus.clear();
    let line = restore_refused(&crafted("zero-vcpus", &state));
    assert!(
        line.contains("corrupt") && line.contains("0 vCPUs"),
        "{line}"
    );

    for (name, mib) in [("huge", 1u64 << 40), ("wraps", (1u64 << 44) + 32)] {
        let mut state = read_state(snapshot()).unwrap();
        state.machine.memory_mib = mib;
        let line = restore_refused(&crafted(name, &state));
        assert!(
            line.contains("corrupt") && line.contains(&format!("{mib} MiB")),
            "{line}"
        );
    }
}

#[test]
fn hostile_serial_file_symlink_is_not_followed() {
    let dir = scratch("serial-link");
    let victim = dir.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let link = dir.join("console");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let line = fails(
        kiln()
            .args(["run", "--memory", "32", "--kernel"])
            .arg(spin_kernel(&dir))
            .arg("--serial")
            .arg(&link),
    );
    assert!(line.contains("serial output file"), "{line}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

/// Boots the spinning guest with an API socket, a vsock socket and a serial file in `dir`
/// (plus `flags`), and waits until it answers on its API.
fn start_vm(dir: &Path, flags: &[&str]) -> Guard {
    let mut vm = Guard::new(
        kiln()
            .args(["run", "--memory", "32", "--kernel"])
            .arg(spin_kernel(dir))
            .arg("--api")
            .arg(dir.join("api.sock"))
            .arg("--vsock")
            .arg(dir.join("v.sock"))
            .arg("--serial")
            .arg(dir.join("console"))
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    assert!(
        wait_answering(&dir.join("api.sock"), &mut vm.child),
        "the VM never answered on its API"
    );
    vm
}

/// Every file and socket of a running VM and of a snapshot it takes: nothing for others
/// (the mode is checked, the umask of this test process notwithstanding).
#[test]
fn hostile_every_file_and_socket_of_a_vm_is_private() {
    let dir = scratch("modes");
    // A snapshot directory that already holds a planted link named like a snapshot file:
    // the snapshot must not write through it.
    let snap = dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let victim = dir.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, snap.join("memory")).unwrap();
    let new_snap = dir.join("new-snap");

    let mut vm = start_vm(&dir, &[]);
    let api = dir.join("api.sock");
    ctl_ok(&api, &["snapshot", "--dir", snap.to_str().unwrap()]);
    ctl_ok(&api, &["snapshot", "--dir", new_snap.to_str().unwrap()]);
    let mut listed = Vec::new();
    for path in [
        api.clone(),
        dir.join("v.sock"),
        dir.join("console"),
        new_snap.clone(),
        snap.join("state"),
        snap.join("memory"),
        new_snap.join("state"),
        new_snap.join("memory"),
    ] {
        let m = mode(&path);
        listed.push(format!("{:o} {}", m, path.display()));
        assert_eq!(m & 0o077, 0, "{} is {m:o}", path.display());
    }
    eprintln!("{}", listed.join("\n"));
    assert_eq!(mode(&new_snap), 0o700);
    assert!(std::fs::symlink_metadata(snap.join("memory"))
        .unwrap()
        .is_file());
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(vm.terminate().code(), Some(128 + libc::SIGTERM));

    // With a socket group, both sockets are 0660 and that group's.
    let dir = scratch("modes-group");
    // SAFETY: getegid has no arguments and cannot fail.
    let gid = unsafe { libc::getegid() };
    let mut vm = start_vm(&dir, &["--socket-group", &gid.to_string()]);
    for sock in ["api.sock", "v.sock"] {
        let path = dir.join(sock);
        assert_eq!(mode(&path), 0o660, "{sock}");
        assert_eq!(std::fs::symlink_metadata(&path).unwrap().gid(), gid);
    }
    assert_eq!(mode(&dir.join("console")), 0o600);
    assert_eq!(vm.terminate().code(), Some(128 + libc::SIGTERM));

    // An unknown group is refused before any VM is built.
    let line = fails(
        kiln()
            .args([
                "run",
                "--memory",
                "32",
                "--socket-group",
                "no-such-group-kiln",
            ])
            .arg("--kernel")
            .arg(spin_kernel(&dir)),
    );
    assert!(line.contains("no-such-group-kiln"), "{line}");
}

/// A client that connects to the API or the vsock socket and says nothing is dropped after
/// the handshake timeout (5 s), and while it waits the VM goes on answering.
#[test]
fn hostile_silent_clients_are_dropped_without_blocking_the_vm() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};
    let dir = scratch("silent");
    let mut vm = start_vm(&dir, &[]);
    let api = dir.join("api.sock");
    let start = Instant::now();
    let mut silent = [
        ("API", UnixStream::connect(&api).unwrap()),
        ("vsock", UnixStream::connect(dir.join("v.sock")).unwrap()),
    ];
    assert_eq!(ctl_ok(&api, &["status"])["state"], "running");
    for (what, client) in &mut silent {
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let n = client
            .read(&mut [0u8; 1])
            .unwrap_or_else(|e| panic!("{what}: not closed by kiln: {e}"));
        assert_eq!(n, 0, "{what}: EOF");
    }
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(20),
        "dropped after {waited:?}"
    );
    assert_eq!(ctl_ok(&api, &["status"])["state"], "running");
    assert_eq!(vm.terminate().code(), Some(128 + libc::SIGTERM));
}
