//! The lifecycle of a jailed VMM on the direct path: what the host's /proc shows of it
//! and SIGTERM (early or not), a killed `kiln jail`, and a snapshot taken in one jail
//! restored in another.

mod util;

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use util::jail::*;
use util::vm::{ctl_ok, wait_answering};
use util::*;

/// The jailed VMM seen from the host's /proc while a spinning guest runs: the ids, no
/// capabilities, its own namespaces and root; then SIGTERM to `kiln jail` reaches it.
#[test]
fn jail_vmm_is_unprivileged_in_its_own_namespaces_and_stops_on_sigterm() {
    let Some(dir) = root_scratch("proc") else {
        return;
    };
    let kernel = util::vm::spin_kernel(&dir);
    let base = dir.join("base");
    // A file the jail's uid owns and may write is copied, not linked.
    let mine = dir.join("mine.bin");
    std::fs::write(&mine, "mine").unwrap();
    std::os::unix::fs::chown(&mine, Some(4321), Some(4322)).unwrap();
    let mut child = kiln_jail(
        &base,
        "spin",
        &[
            "--uid",
            "4321",
            "--gid",
            "4322",
            "--file",
            kernel.to_str().unwrap(),
            "--file",
            mine.to_str().unwrap(),
        ],
        &[
            "run", "--kernel", "spin.elf", "--memory", "32", "--api", "api.sock",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let (words, seen, mut stderr) = pid_line(&mut child);
    let pid = &words[0];
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
        rest
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    assert_eq!(next_line(&mut stdout), util::vm::MESSAGE);

    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    // kiln installs its seccomp filters once the VM runs: give it a moment.
    let mut status = String::new();
    for _ in 0..50 {
        status = std::fs::read_to_string(proc_dir.join("status")).unwrap();
        if status
            .lines()
            .any(|l| l.starts_with("Seccomp:") && l.ends_with('2'))
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let field = |name: &str| status_field(&status, name);
    assert_eq!(field("Uid"), "4321 4321 4321 4321", "{status}");
    assert_eq!(field("Gid"), "4322 4322 4322 4322", "{status}");
    assert_eq!(field("Groups"), "", "{status}");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(caps), "0000000000000000", "{caps}: {status}");
    }
    assert_eq!(field("NoNewPrivs"), "1", "{status}");
    assert_eq!(field("Seccomp"), "2", "kiln's own filters are on: {status}");
    // In its PID namespace it is PID 1.
    assert_eq!(field("NSpid").split(' ').nth(1), Some("1"), "{status}");
    for ns in ["mnt", "pid", "net", "uts", "ipc"] {
        let theirs = std::fs::read_link(proc_dir.join("ns").join(ns)).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace is the host's");
    }
    let list = |p: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let root = list(&proc_dir.join("root"));
    for name in ["api.sock", "dev", "kiln", "spin.elf", "mine.bin"] {
        assert!(
            root.contains(&name.to_string()),
            "{name} missing from {root:?}"
        );
    }
    // A debug kiln brings its loader and libraries; nothing else of the host is there.
    for name in &root {
        assert!(
            ["api.sock", "dev", "kiln", "spin.elf", "mine.bin", "lib", "lib64", "usr"]
                .contains(&name.as_str()),
            "unexpected {name} in the jail root: {root:?}"
        );
    }
    use std::os::unix::fs::MetadataExt;
    let nlink = |name: &str| {
        std::fs::metadata(proc_dir.join("root").join(name))
            .unwrap()
            .nlink()
    };
    assert_eq!(
        nlink("spin.elf"),
        2,
        "a root-owned 0644 file is hard-linked"
    );
    assert_eq!(nlink("mine.bin"), 1, "a file the uid could write is copied");
    let dev = list(&proc_dir.join("root/dev"));
    assert!(dev == ["kvm"] || dev == ["kvm", "net"], "{dev:?}");
    let cwd = std::fs::read_link(proc_dir.join("cwd")).unwrap();
    assert_eq!(cwd, Path::new("/"));

    signal(&child, libc::SIGTERM);
    let status = child.wait().unwrap();
    let rest = drain.join().unwrap();
    assert_eq!(status.code(), Some(143), "{seen}{rest}");
    assert!(!base.join("spin").exists(), "the jail directory is removed");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A snapshot taken inside one jail (written below its root by the jailed VMM) restores
/// in another jail, under another uid, given as a `--file` directory.
#[test]
fn jail_snapshot_taken_in_one_jail_restores_in_another() {
    let Some(dir) = root_scratch("snap") else {
        return;
    };
    let kernel = util::vm::spin_kernel(&dir);
    let base = dir.join("base");
    let mut a = kiln_jail(
        &base,
        "a",
        &[
            "--uid",
            "4321",
            "--gid",
            "4321",
            "--file",
            kernel.to_str().unwrap(),
        ],
        &[
            "run", "--kernel", "spin.elf", "--memory", "32", "--api", "api.sock", "--serial",
            "null",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let api_a = base.join("a/root/api.sock");
    assert!(
        wait_answering(&api_a, &mut a),
        "jail a's API never answered"
    );
    ctl_ok(&api_a, &["snapshot", "--dir", "/snap"]);
    // The VMM wrote it into its root; take it out before jail a goes.
    let snap = dir.join("snap");
    std::fs::rename(base.join("a/root/snap"), &snap).unwrap();
    signal(&a, libc::SIGTERM);
    let out = a.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut b = kiln_jail(
        &base,
        "b",
        &[
            "--uid",
            "5000",
            "--gid",
            "5000",
            "--file",
            snap.to_str().unwrap(),
        ],
        &[
            "restore",
            "--snapshot",
            "snap",
            "--api",
            "api.sock",
            "--serial",
            "null",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let api_b = base.join("b/root/api.sock");
    let up = wait_answering(&api_b, &mut b);
    signal(&b, libc::SIGTERM);
    let out = b.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(up, "the restored VM never answered: {stderr}");
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(!base.join("a").exists() && !base.join("b").exists());
    assert!(snap.join("memory").exists(), "the host's snapshot stays");
    std::fs::remove_dir_all(dir).unwrap();
}

/// SIGKILL to `kiln jail` takes the VMM with it (parent-death signal); the directory it
/// leaves is stale, and the next jail of that ID replaces it.
#[test]
fn jail_killed_outer_takes_the_vmm_along_and_its_id_is_reusable() {
    let Some(dir) = root_scratch("pdeath") else {
        return;
    };
    let kernel = util::vm::spin_kernel(&dir);
    let base = dir.join("base");
    let start = || {
        kiln_jail(
            &base,
            "k",
            &["--file", kernel.to_str().unwrap()],
            &["run", "--kernel", "spin.elf", "--memory", "32"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let mut outer = start();
    let (words, _, _stderr) = pid_line(&mut outer);
    let pid = &words[0];
    let mut stdout = BufReader::new(outer.stdout.take().unwrap());
    assert_eq!(next_line(&mut stdout), util::vm::MESSAGE);
    outer.kill().unwrap();
    outer.wait().unwrap();
    let vmm = PathBuf::from(format!("/proc/{pid}"));
    let gone = (0..100).any(|_| {
        // A zombie is gone too: its parent was the killed kiln jail, and init reaps it.
        let state = std::fs::read_to_string(vmm.join("stat")).unwrap_or_default();
        let alive = state
            .split(") ")
            .nth(1)
            .is_some_and(|s| !s.starts_with('Z'));
        if alive {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        !alive
    });
    assert!(gone, "the VMM {pid} outlived kiln jail");
    assert!(
        base.join("k/jail.pid").exists(),
        "SIGKILL leaves the directory"
    );
    let mut again = start();
    let mut stdout = BufReader::new(again.stdout.take().unwrap());
    assert_eq!(next_line(&mut stdout), util::vm::MESSAGE);
    signal(&again, libc::SIGTERM);
    let out = again.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("removing the stale"), "{stderr}");
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(!base.join("k").exists(), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// SIGTERM right after the jail is up, before the inner kiln may have its handlers (PID 1
/// of a namespace drops unhandled signals): kiln jail holds it until they exist.
#[test]
fn jail_early_sigterm_still_stops_the_vm() {
    let Some(dir) = root_scratch("early") else {
        return;
    };
    let kernel = util::vm::spin_kernel(&dir);
    let base = dir.join("base");
    for round in 0..3 {
        let mut outer = kiln_jail(
            &base,
            "e",
            &["--file", kernel.to_str().unwrap()],
            &[
                "run", "--kernel", "spin.elf", "--memory", "32", "--serial", "null",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let (_, seen, mut stderr) = pid_line(&mut outer);
        signal(&outer, libc::SIGTERM);
        let status = outer.wait().unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
        assert_eq!(status.code(), Some(143), "round {round}: {seen}{rest}");
        assert!(!base.join("e").exists(), "round {round}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
