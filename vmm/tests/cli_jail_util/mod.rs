//! Shared by the `cli_jail*` tests: running `kiln jail`, scratch directories, checks on its
//! one-line errors, and `kiln ctl` against a jailed VM's API socket.

#![allow(dead_code)] // each test file uses part of it

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cli-jail-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn kiln_jail(base: &Path, id: &str, extra: &[&str], inner: &[&str]) -> Command {
    kiln_jail_with(
        Path::new(env!("CARGO_BIN_EXE_kiln")),
        base,
        id,
        extra,
        inner,
    )
}

/// [`kiln_jail`] with the kiln binary `kiln` (a copy another user can run, say).
pub fn kiln_jail_with(
    kiln: &Path,
    base: &Path,
    id: &str,
    extra: &[&str],
    inner: &[&str],
) -> Command {
    let mut cmd = Command::new(kiln);
    cmd.args(["jail", "--id", id, "--base", base.to_str().unwrap()])
        .args(extra)
        .arg("--")
        .args(inner);
    cmd
}

/// Asserts a failure with exactly one line on stderr holding `needle`, and no panic.
pub fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(needle), "wanted {needle:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

/// `kiln ctl --api API ARGS`; its output.
pub fn ctl(api: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("ctl")
        .arg("--api")
        .arg(api)
        .args(args)
        .output()
        .unwrap()
}

/// Polls `kiln ctl status` on `api` for up to 20 s; true once it answers ok.
pub fn answers(api: &Path) -> bool {
    for _ in 0..200 {
        if api.exists() && ctl(api, &["--timeout", "5", "status"]).status.success() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}
