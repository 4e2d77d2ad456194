//! What the `kiln image` CLI tests share: running kiln, checking its one error line.

#![allow(dead_code)] // each test file uses part of it

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A static ELF every test machine has (busybox-static): enough to stand in for the agent
/// where only its installation is under test.
pub const STATIC_ELF: &str = "/bin/busybox";

pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cli-image-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn kiln<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env_remove("KILN_IMAGE_STORE")
        .env_remove("KILN_AGENT")
        .output()
        .expect("run kiln")
}

/// Asserts that `kiln ARGS` fails with one error line and no panic; returns that line.
pub fn fails<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let out = kiln(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "kiln {args:?} succeeded: {stderr}");
    assert_ne!(out.status.code(), Some(101), "kiln panicked: {stderr}");
    assert!(!stderr.contains("panicked"), "kiln panicked: {stderr}");
    // kiln's own error line (clap's start `error:`); tar's complaints may come before it.
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("kiln: error") || l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "expected one error line, got: {stderr}");
    errors[0].to_string()
}

pub fn succeeds<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let out = kiln(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kiln {args:?} failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The names in the image store directory `store`: an error if it cannot be read (as when
/// it does not exist).
pub fn store_entries(store: &Path) -> std::io::Result<Vec<std::ffi::OsString>> {
    Ok(std::fs::read_dir(store)?
        .flatten()
        .map(|e| e.file_name())
        .collect())
}

/// A file's contents read out of an ext4 image with e2fsprogs' debugfs.
pub fn debugfs_cat(image: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(image)
        .output()
        .expect("run debugfs (e2fsprogs)");
    out.stdout
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
