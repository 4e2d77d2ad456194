//! Each jail runs as a uid of its own, taken from `--uid-range` and held while the jail
//! lives; and the jail root is handed to that uid only once it is complete.

mod util;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Stdio};

use util::jail::*;
use util::*;

/// A jailed spinning VM: the `kiln jail` child, and the uid and gid its pid line names.
struct Spinning {
    child: Child,
    uid: u32,
    gid: u32,
    pid: String,
}

fn spin(base: &Path, kernel: &Path, id: &str, range: &str) -> Spinning {
    let mut child = kiln_jail(
        base,
        id,
        &["--uid-range", range, "--file", kernel.to_str().unwrap()],
        &["run", "--kernel", "spin.elf", "--memory", "32"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let (words, _, mut stderr) = pid_line(&mut child);
    // Keep reading stderr so that kiln never blocks on it.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    Spinning {
        child,
        uid: words[2].parse().unwrap(),
        gid: words[4].parse().unwrap(),
        pid: words[0].clone(),
    }
}

impl Spinning {
    fn proc_ids(&self, field: &str) -> String {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        status_field(&status, field)
    }

    fn stop(mut self) {
        signal(&self.child, libc::SIGTERM);
        let status = self.child.wait().unwrap();
        assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    }
}

#[test]
fn jail_each_jail_runs_as_a_uid_of_its_own_from_the_range() {
    let Some(dir) = root_scratch("uids") else {
        return;
    };
    let kernel = util::vm::spin_kernel(&dir);
    let base = dir.join("base");

    let a = spin(&base, &kernel, "a", "4400:2");
    let b = spin(&base, &kernel, "b", "4400:2");
    assert_eq!((a.uid, a.gid), (4400, 4400));
    assert_eq!((b.uid, b.gid), (4401, 4401));
    assert_eq!(a.proc_ids("Uid"), "4400 4400 4400 4400");
    assert_eq!(b.proc_ids("Uid"), "4401 4401 4401 4401");
    assert_eq!(b.proc_ids("Gid"), "4401 4401 4401 4401");

    // The range is used up while both run: a third jail is refused, in one line, and
    // leaves no directory behind.
    let out = kiln_jail(
        &base,
        "c",
        &["--uid-range", "4400:2", "--file", kernel.to_str().unwrap()],
        &["run", "--kernel", "spin.elf"],
    )
    .output()
    .unwrap();
    assert_one_line_error(
        &out,
        "every uid of the range 4400:2 is held by a running jail",
    );
    assert!(!base.join("c").exists());

    // A jail's uid is free again once it ended.
    a.stop();
    let again = spin(&base, &kernel, "d", "4400:2");
    assert_eq!(again.uid, 4400);
    again.stop();
    b.stop();

    // Bad ranges are refused before anything is made.
    for (range, says) in [
        ("0:5", "uid 0"),
        ("4400", "START:COUNT"),
        ("4400:0", "empty"),
    ] {
        let out = kiln_jail(&base, "e", &["--uid-range", range], &["run"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{range}: {stderr}");
        assert!(stderr.contains(says), "{range}: {stderr}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The finished root: directories (the root, a `--file` directory and its subdirectory)
/// belong to the jail's uid; a file it could not read is a copy it owns, without the
/// source's set-uid bit; a readable one stays root's (a hard link or a copy).
#[test]
fn jail_root_is_handed_over_complete_and_copies_carry_no_set_id_bits() {
    let Some(dir) = root_scratch("handover") else {
        return;
    };
    let kernel = tiny_kernel(&dir, "hello\n");
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    let secret = data.join("sub/secret");
    std::fs::write(&secret, "s").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o4700)).unwrap();
    std::fs::write(data.join("open"), "o").unwrap();
    std::fs::set_permissions(data.join("open"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let base = dir.join("base");
    run_ok(&mut kiln_jail(
        &base,
        "h",
        &[
            "--uid",
            "4500",
            "--gid",
            "4501",
            "--keep",
            "--file",
            kernel.to_str().unwrap(),
            "--file",
            data.to_str().unwrap(),
        ],
        &["run", "--kernel", "tiny.elf", "--memory", "32"],
    ));
    let root = base.join("h/root");
    let owner = |p: &Path| {
        let m = std::fs::symlink_metadata(p).unwrap();
        (m.uid(), m.gid())
    };
    for d in [root.clone(), root.join("data"), root.join("data/sub")] {
        assert_eq!(owner(&d), (4500, 4501), "{}", d.display());
    }
    assert_eq!(
        owner(&base.join("h")),
        (0, 0),
        "the jail directory stays root's"
    );
    let copy = root.join("data/sub/secret");
    assert_eq!(owner(&copy), (4500, 4501));
    let mode = std::fs::metadata(&copy).unwrap().mode();
    assert_eq!(mode & 0o7777, 0o700, "mode {mode:o}");
    assert_eq!(owner(&root.join("data/open")).0, 0);
    assert_eq!(
        std::fs::metadata(&secret).unwrap().uid(),
        0,
        "the host's file keeps its owner"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
