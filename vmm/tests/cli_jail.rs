//! `kiln jail` on the direct path: its one-line errors (not root, a missing --file, a
//! taken ID, a base that cannot be written) and a jailed `kiln run` of the tiny ELF kernel,
//! which shows the namespaces, the root switch, `/dev/kvm` and the drop of privileges work
//! on this machine's /dev/kvm.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cli-jail-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn kiln_jail(base: &Path, id: &str, extra: &[&str], inner: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(["jail", "--id", id, "--base", base.to_str().unwrap()])
        .args(extra)
        .arg("--")
        .args(inner);
    cmd
}

/// Asserts a failure with exactly one line on stderr holding `needle`, and no panic.
fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(needle), "wanted {needle:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn jail_refuses_without_root() {
    let base = tmp("noroot");
    let mut cmd = kiln_jail(&base, "j", &[], &["run", "--kernel", "k"]);
    if is_root() {
        // Run it as nobody (the binary and its directories are world-readable here).
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().unwrap();
    assert_one_line_error(&out, "kiln jail must run as root");
    std::fs::remove_dir_all(base).unwrap();
}

#[test]
fn jail_reports_bad_input_in_one_line() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let base = tmp("errors");
    // A missing --file.
    let missing = base.join("no-such-kernel");
    let out = kiln_jail(&base, "j", &["--file", missing.to_str().unwrap()], &["run"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "--file");
    assert!(
        !base.join("j").exists(),
        "nothing is created before the checks pass"
    );

    // A bad ID.
    let out = kiln_jail(&base, "../x", &[], &["run"]).output().unwrap();
    assert_one_line_error(&out, "is not valid");

    // Root as the inner uid.
    let out = kiln_jail(&base, "j", &["--uid", "0"], &["run"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "--uid 0");

    // An ID in use: its jail.pid names a live process (this one).
    std::fs::create_dir_all(base.join("busy")).unwrap();
    std::fs::write(
        base.join("busy/jail.pid"),
        format!("{}\n", std::process::id()),
    )
    .unwrap();
    let out = kiln_jail(&base, "busy", &[], &["run"]).output().unwrap();
    assert_one_line_error(&out, "is taken");
    assert!(
        base.join("busy/jail.pid").exists(),
        "a jail in use is left alone"
    );

    // A base that cannot be made: below a regular file.
    std::fs::write(base.join("file"), "").unwrap();
    let bad = base.join("file/base");
    let out = kiln_jail(&bad, "j", &[], &["run"]).output().unwrap();
    assert_one_line_error(&out, "cannot create the jail directory");
    std::fs::remove_dir_all(base).unwrap();
}

#[test]
fn jail_runs_the_tiny_kernel_unprivileged_and_cleans_up() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tmp("run");
    let kernel = dir.join("tiny.elf");
    std::fs::write(
        &kernel,
        kiln_tests::tiny_kernel::build("hello from the jail\n"),
    )
    .unwrap();
    let base = dir.join("base");
    // A stale jail directory (its owner is gone) is replaced.
    std::fs::create_dir_all(base.join("t1/root")).unwrap();
    std::fs::write(base.join("t1/jail.pid"), "999999999\n").unwrap();
    let out = kiln_jail(
        &base,
        "t1",
        &[
            "--uid",
            "65534",
            "--gid",
            "65534",
            "--file",
            kernel.to_str().unwrap(),
        ],
        &[
            "run", "--kernel", "tiny.elf", "--memory", "64", "--json", "--api", "api.sock",
        ],
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.starts_with("hello from the jail\n"), "{stdout}");
    assert!(stdout.contains("\"result\":\"reset\""), "{stdout}");
    assert!(stderr.contains("kiln jail: t1 runs as pid"), "{stderr}");
    let mapped = base.join("t1/root/api.sock");
    assert!(
        stderr.contains(&format!(
            "--api api.sock is {} on the host",
            mapped.display()
        )),
        "{stderr}"
    );
    assert!(!base.join("t1").exists(), "the jail directory is removed");
    assert!(kernel.exists(), "the host's file stays");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The jailed VMM seen from the host's /proc while a spinning guest runs: the ids, no
/// capabilities, its own namespaces and root; then SIGTERM to `kiln jail` reaches it.
#[test]
fn jail_vmm_is_unprivileged_in_its_own_namespaces_and_stops_on_sigterm() {
    use kiln_tests::tiny_kernel::{build_with, End};
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tmp("proc");
    let kernel = dir.join("spin.elf");
    std::fs::write(&kernel, build_with("spinning now\n", End::Spin)).unwrap();
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
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut pid = None;
    let mut seen = String::new();
    let mut line = String::new();
    while pid.is_none() && stderr.read_line(&mut line).unwrap() > 0 {
        if let Some(rest) = line.split("runs as pid ").nth(1) {
            pid = rest.split_whitespace().next().map(str::to_owned);
        }
        seen.push_str(&line);
        line.clear();
    }
    let pid = pid.unwrap_or_else(|| panic!("no pid line: {seen}"));
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
        rest
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert_eq!(first, "spinning now\n");

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
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
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

    // SAFETY: kill takes no pointers; the pid is our child's.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
    let status = child.wait().unwrap();
    let rest = drain.join().unwrap();
    assert_eq!(status.code(), Some(143), "{seen}{rest}");
    assert!(!base.join("spin").exists(), "the jail directory is removed");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `kiln ctl --api API ARGS`; its output.
fn ctl(api: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("ctl")
        .arg("--api")
        .arg(api)
        .args(args)
        .output()
        .unwrap()
}

/// Polls `kiln ctl status` on `api` for up to 20 s; true once it answers ok.
fn answers(api: &Path) -> bool {
    for _ in 0..200 {
        if api.exists() && ctl(api, &["--timeout", "5", "status"]).status.success() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

/// A snapshot taken inside one jail (written below its root by the jailed VMM) restores
/// in another jail, under another uid, given as a `--file` directory.
#[test]
fn jail_snapshot_taken_in_one_jail_restores_in_another() {
    use kiln_tests::tiny_kernel::{build_with, End};
    use std::process::Stdio;
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tmp("snap");
    let kernel = dir.join("spin.elf");
    std::fs::write(&kernel, build_with("spinning now\n", End::Spin)).unwrap();
    let base = dir.join("base");
    let a = kiln_jail(
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
    assert!(answers(&api_a), "jail a's API never answered");
    let out = ctl(&api_a, &["snapshot", "--dir", "/snap"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The VMM wrote it into its root; take it out before jail a goes.
    let snap = dir.join("snap");
    std::fs::rename(base.join("a/root/snap"), &snap).unwrap();
    // SAFETY: kill takes no pointers; the pid is our child's.
    unsafe { libc::kill(i32::try_from(a.id()).unwrap(), libc::SIGTERM) };
    let out = a.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let b = kiln_jail(
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
    let up = answers(&api_b);
    // SAFETY: as above.
    unsafe { libc::kill(i32::try_from(b.id()).unwrap(), libc::SIGTERM) };
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
    use kiln_tests::tiny_kernel::{build_with, End};
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tmp("pdeath");
    let kernel = dir.join("spin.elf");
    std::fs::write(&kernel, build_with("spinning now\n", End::Spin)).unwrap();
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
    let mut stderr = BufReader::new(outer.stderr.take().unwrap());
    let mut line = String::new();
    let mut pid = None;
    while pid.is_none() && stderr.read_line(&mut line).unwrap() > 0 {
        pid = line
            .split("runs as pid ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_owned);
        line.clear();
    }
    let pid = pid.expect("no pid line");
    let mut first = String::new();
    BufReader::new(outer.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first, "spinning now\n");
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
    let mut first = String::new();
    BufReader::new(again.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first, "spinning now\n");
    // SAFETY: kill takes no pointers; the pid is our child's.
    unsafe { libc::kill(i32::try_from(again.id()).unwrap(), libc::SIGTERM) };
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
    use kiln_tests::tiny_kernel::{build_with, End};
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tmp("early");
    let kernel = dir.join("spin.elf");
    std::fs::write(&kernel, build_with("spinning now\n", End::Spin)).unwrap();
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
        let mut stderr = BufReader::new(outer.stderr.take().unwrap());
        let mut seen = String::new();
        while !seen.contains("runs as pid") && stderr.read_line(&mut seen).unwrap() > 0 {}
        // SAFETY: kill takes no pointers; the pid is our child's.
        unsafe { libc::kill(i32::try_from(outer.id()).unwrap(), libc::SIGTERM) };
        let status = outer.wait().unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
        assert_eq!(status.code(), Some(143), "round {round}: {seen}{rest}");
        assert!(!base.join("e").exists(), "round {round}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// `kiln jail --image NAME` brings a store image in as `/images/NAME` (hard-linked, not
/// copied) and makes `/images` the inner kiln's store, so a jailed `kiln run --image NAME`
/// boots with it; a missing image is refused before any jail is made, in one line.
#[test]
fn jail_brings_in_a_store_image_for_image() {
    use std::os::unix::fs::MetadataExt;
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tmp("image");
    let kernel = dir.join("tiny.elf");
    std::fs::write(&kernel, kiln_tests::tiny_kernel::build("hello image\n")).unwrap();
    // A store image made by hand: a small file with the ext4 superblock magic.
    let store = dir.join("store");
    std::fs::create_dir_all(store.join("tiny")).unwrap();
    let mut rootfs = vec![0u8; 64 << 10];
    rootfs[1080..1082].copy_from_slice(&[0x53, 0xef]);
    std::fs::write(store.join("tiny/rootfs.ext4"), &rootfs).unwrap();
    let base = dir.join("base");
    let store_arg = store.to_str().unwrap();
    let out = kiln_jail(
        &base,
        "img1",
        &[
            "--file",
            kernel.to_str().unwrap(),
            "--image",
            "tiny",
            "--store",
            store_arg,
            "--keep",
        ],
        &[
            "run", "--kernel", "tiny.elf", "--image", "tiny", "--memory", "64", "--json",
        ],
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.starts_with("hello image\n"), "{stdout}");
    let inode = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(
        inode(&store.join("tiny/rootfs.ext4")),
        inode(&base.join("img1/root/images/tiny/rootfs.ext4")),
        "the image is hard-linked into the jail"
    );
    assert_eq!(
        std::fs::read(store.join("tiny/rootfs.ext4")).unwrap(),
        rootfs
    );

    let out = kiln_jail(
        &base,
        "img2",
        &["--image", "nope", "--store", store_arg],
        &["run", "--kernel", "tiny.elf", "--image", "nope"],
    )
    .output()
    .unwrap();
    assert_one_line_error(&out, "nope");
    assert!(!base.join("img2").exists(), "no jail is made");
    std::fs::remove_dir_all(dir).unwrap();
}
