//! What the `kiln image` tests share: kiln without the machine's image-store settings, its
//! one error line, and reading the ext4 images it makes with e2fsprogs' debugfs.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

/// A static ELF every test machine has (busybox-static): enough to stand in for the agent
/// where only its installation is under test.
pub const STATIC_ELF: &str = "/bin/busybox";

/// `kiln ARGS` without the machine's image store and agent settings.
pub fn kiln_cmd<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut cmd = super::kiln();
    cmd.args(args)
        .env_remove("KILN_IMAGE_STORE")
        .env_remove("KILN_AGENT");
    cmd
}

pub fn kiln<S: AsRef<OsStr>>(args: &[S]) -> Output {
    kiln_cmd(args).output().expect("run kiln")
}

/// Asserts that `out` failed cleanly with one error line of kiln's own (`kiln: error…`, or
/// clap's `error:`; tar's complaints may come before it) and returns that line.
pub fn kiln_error_line(what: &str, out: &Output) -> String {
    let stderr = super::failed_cleanly(what, out);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("kiln: error") || l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "expected one error line, got: {stderr}");
    errors[0].to_string()
}

/// Asserts that `kiln ARGS` fails with one error line and no panic; returns that line.
pub fn fails<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    kiln_error_line(&format!("kiln {args:?}"), &kiln(args))
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

/// What e2fsprogs' debugfs prints for the request `cmd` on the ext4 image `image`.
pub fn debugfs_output(image: &Path, cmd: &str) -> Output {
    Command::new("debugfs")
        .arg("-R")
        .arg(cmd)
        .arg(image)
        .output()
        .expect("run debugfs (e2fsprogs)")
}

/// A file's contents read out of an ext4 image.
pub fn debugfs_cat(image: &Path, path: &str) -> Vec<u8> {
    debugfs_output(image, &format!("cat {path}")).stdout
}

/// What debugfs says (stdout and stderr) about `cmd` in `image`.
pub fn debugfs(image: &Path, cmd: &str) -> String {
    let out = debugfs_output(image, cmd);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The names in directory `dir` of `image`, sorted, without `.` and `..`.
pub fn names_in(image: &Path, dir: &str) -> Vec<String> {
    let mut names: Vec<String> = debugfs(image, &format!("ls -p {dir}"))
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect();
    names.sort();
    names
}

/// A store image directory made by hand, its "filesystem" with or without the ext4 magic.
pub fn fake_image(store: &Path, name: &str, ext4: bool) -> Vec<u8> {
    let dir = store.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut fs = vec![0u8; 64 << 10];
    if ext4 {
        fs[1080..1082].copy_from_slice(&[0x53, 0xef]);
    }
    std::fs::write(dir.join("rootfs.ext4"), &fs).unwrap();
    fs
}
