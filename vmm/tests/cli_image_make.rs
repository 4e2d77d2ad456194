//! `kiln image build|import|ls|rm` from the command line, directly: bad input is refused
//! before any work, an import makes, lists, replaces and removes an image, and a failed or
//! interrupted one leaves nothing in the store.

mod util;

use std::path::{Path, PathBuf};
use std::process::Command;

use util::image::*;
use util::{is_root, scratch};

#[test]
fn builders_refuse_a_bad_agent_before_any_work() {
    let store = scratch("agent");
    let s = store.to_str().unwrap();
    let line = fails(&[
        "image",
        "build",
        "--name",
        "x",
        "--store",
        s,
        "--agent",
        "/nonexistent/agent",
    ]);
    assert!(
        line.contains("/nonexistent/agent") && line.contains("--agent"),
        "{line}"
    );
    // The test binary itself is dynamically linked.
    let me = std::env::current_exe().unwrap();
    let line = fails(&[
        "image",
        "import",
        "--name",
        "x",
        "--store",
        s,
        "--agent",
        me.to_str().unwrap(),
        "/dev/null",
    ]);
    assert!(line.contains("not a static x86-64 ELF"), "{line}");
    let line = fails(&[
        "image",
        "import",
        "--name",
        "no/pe",
        "--store",
        s,
        "--agent",
        STATIC_ELF,
        "/dev/null",
    ]);
    assert!(
        line.contains("not valid") || line.contains("needs root"),
        "{line}"
    );
    assert_eq!(
        std::fs::read_dir(&store).unwrap().count(),
        0,
        "the store was written"
    );
    std::fs::remove_dir_all(store).unwrap();
}

#[test]
fn import_makes_lists_replaces_and_removes_an_image() {
    let dir = scratch("import");
    let store = dir.join("store");
    let s = store.to_str().unwrap();
    let not_tar = dir.join("not.tar");
    std::fs::write(&not_tar, "this is not a tarball\n".repeat(100)).unwrap();
    let import = |name: &str, tar: &Path, force: bool| {
        let mut args = vec![
            "image", "import", "--name", name, "--store", s, "--agent", STATIC_ELF,
        ];
        if force {
            args.push("--force");
        }
        args.push(tar.to_str().unwrap());
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    if !is_root() {
        let line = fails(&import("t", &not_tar, false));
        assert!(line.contains("needs root"), "{line}");
        return;
    }
    let line = fails(&import("t", &not_tar, false));
    assert!(
        line.contains("extracting") && line.contains("tar archive"),
        "{line}"
    );
    assert_eq!(
        std::fs::read_dir(&store).unwrap().count(),
        0,
        "a failed import left {:?}",
        std::fs::read_dir(&store).unwrap().collect::<Vec<_>>()
    );

    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/marker"), "imported\n").unwrap();
    let tar = dir.join("rootfs.tar");
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&tree)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    succeeds(&import("t", &tar, false));
    let line = fails(&import("t", &tar, false));
    assert!(
        line.contains("already exists") && line.contains("--force"),
        "{line}"
    );
    succeeds(&import("t", &tar, true));

    let table = succeeds(&["image", "ls", "--store", s]);
    let row = table
        .lines()
        .find(|l| l.starts_with("t "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("MiB") && row.contains("import"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&succeeds(&["image", "ls", "--json", "--store", s])).unwrap();
    let image = &json[0];
    assert_eq!(image["name"], "t");
    let rootfs = PathBuf::from(image["path"].as_str().unwrap());
    let bytes = std::fs::read(&rootfs).unwrap();
    assert_eq!(&bytes[1080..1082], &[0x53, 0xef], "not ext4");
    assert_eq!(image["size_bytes"].as_u64(), Some(bytes.len() as u64));
    assert_eq!(image["sha256"].as_str().map(str::len), Some(64));
    assert_eq!(image["source"]["kind"], "import");
    assert_eq!(debugfs_cat(&rootfs, "/etc/marker"), b"imported\n");
    let agent = debugfs_cat(&rootfs, "/sbin/kiln-agent");
    assert_eq!(
        agent,
        std::fs::read(STATIC_ELF).unwrap(),
        "the agent is not /sbin/kiln-agent"
    );
    // Only the finished image is in the store: no staging or replaced directories.
    let entries = store_entries(&store).unwrap();
    assert_eq!(entries, ["t"], "{entries:?}");

    // verify: the file has the SHA-256 its metadata records, until a byte of it changes.
    let sha = image["sha256"].as_str().unwrap();
    assert_eq!(
        succeeds(&["image", "verify", "--store", s]).trim(),
        format!("t: ok (sha256 {sha})")
    );
    let mut changed = bytes.clone();
    changed[4096] ^= 0x01;
    std::fs::write(&rootfs, &changed).unwrap();
    let line = fails(&["image", "verify", "t", "--store", s]);
    assert!(
        line.contains("image \"t\"")
            && line.contains(sha)
            && line.contains("changed or is corrupt"),
        "{line}"
    );
    let line = fails(&["image", "verify", "nope", "--store", s]);
    assert!(line.contains("no image \"nope\""), "{line}");
    std::fs::write(&rootfs, &bytes).unwrap();
    succeeds(&["image", "verify", "t", "--store", s]);

    succeeds(&["image", "rm", "t", "--store", s]);
    assert_eq!(
        succeeds(&["image", "ls", "--json", "--store", s]).trim(),
        "[]"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// SIGTERM during an import: kiln stops at its next step and leaves nothing in the store.
/// The tarball is a FIFO, so the test knows when kiln is reading it (its open for writing
/// returns then) without guessing at timing: it signals kiln, then lets the read end.
#[test]
fn an_interrupted_import_leaves_nothing() {
    if !is_root() {
        return; // import refuses to start without root (tested above).
    }
    let dir = scratch("interrupt");
    let store = dir.join("store");
    let fifo = dir.join("rootfs.tar");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo only reads the NUL-terminated path, alive across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "image", "import", "--name", "t", "--agent", STATIC_ELF, "--store",
        ])
        .arg(&store)
        .arg(&fifo)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Returns once kiln has the tarball open to hash it: its signal handlers are in place.
    let writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill only sends a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    drop(writer);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("interrupted by signal 15"),
        "kiln did not say it was interrupted: {stderr}"
    );
    // kiln may have stopped before it made the store at all.
    let left = store_entries(&store).unwrap_or_default();
    assert!(left.is_empty(), "the interrupted import left {left:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Building and importing need root: anyone else gets one line saying so, before any work.
#[test]
fn builders_say_they_need_root() {
    use std::os::unix::process::CommandExt;
    if !is_root() {
        let line = fails(&["image", "build", "--name", "x", "--agent", STATIC_ELF]);
        assert!(line.contains("needs root"), "{line}");
        return;
    }
    let store = scratch("notroot");
    let s = store.to_str().unwrap();
    let (_bin, kiln) =
        kiln_tests::tmp::copy_for_all_users(Path::new(env!("CARGO_BIN_EXE_kiln"))).unwrap();
    for args in [
        vec![
            "image", "build", "--name", "x", "--agent", STATIC_ELF, "--store", s,
        ],
        vec![
            "image",
            "import",
            "--name",
            "x",
            "--agent",
            STATIC_ELF,
            "--store",
            s,
            "/dev/null",
        ],
    ] {
        let out = Command::new(&kiln)
            .args(&args)
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run kiln as nobody");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("needs root") && stderr.contains("sudo"),
            "{args:?}: {stderr}"
        );
    }
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 0);
    std::fs::remove_dir_all(store).unwrap();
}

/// A debootstrap that fails (its mirror refuses connections: a closed port on loopback, so
/// no network is involved) fails the build with debootstrap named, and leaves nothing.
#[test]
fn a_failed_build_leaves_nothing() {
    if !is_root() {
        return; // build refuses to start without root (tested above).
    }
    let store = scratch("failedbuild");
    let s = store.to_str().unwrap();
    // `kiln image build --name deb` into the store, with `extra` arguments: it must fail.
    let build_fails = |extra: &[&str]| {
        let base = [
            "image", "build", "--name", "deb", "--agent", STATIC_ELF, "--store", s,
        ];
        fails(&[&base[..], extra].concat())
    };
    let line = build_fails(&["--mirror", "http://127.0.0.1:9/debian"]);
    // Without debootstrap installed, the error names the package to install instead.
    assert!(
        line.contains("debootstrap of bookworm from http://127.0.0.1:9/debian failed")
            || line.contains("apt-get install debootstrap"),
        "{line}"
    );
    let left = store_entries(&store).unwrap();
    assert!(left.is_empty(), "the failed build left {left:?}");
    let line = build_fails(&["--packages", "git,bad;name"]);
    assert!(
        line.contains("package name \"bad;name\" is not valid"),
        "{line}"
    );
    std::fs::remove_dir_all(store).unwrap();
}
