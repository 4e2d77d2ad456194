//! What the tests in `vmm/tests` share: the `kiln` binary and checks on how it failed,
//! scratch directories, and, in submodules, spinning guests under `kiln run` with `kiln
//! ctl` (`vm`), `kiln jail` (`jail`), the image store (`image`), a fake guest agent
//! (`agent`), a console sink for VMs built in-process (`console`) and network namespaces
//! (`netns`). Each test file uses part of it.

#![allow(dead_code)]

pub mod agent;
pub mod console;
pub mod image;
pub mod jail;
pub mod netns;
pub mod vm;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::OnceLock;

/// The `kiln` binary under test.
pub fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// This test process's scratch root, `$TMPDIR/kiln-test-<pid>`. Roots left by test
/// processes that are gone are removed the first time.
fn scratch_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let tmp = std::env::temp_dir();
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("kiln-test-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        tmp.join(format!("kiln-test-{}", std::process::id()))
    })
}

/// A fresh, empty scratch directory `name` under this process's root.
pub fn scratch(name: &str) -> PathBuf {
    let dir = scratch_root().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// [`scratch`] for a test that needs root: `None`, and a line saying the test is skipped,
/// for anyone else.
pub fn root_scratch(name: &str) -> Option<PathBuf> {
    if !is_root() {
        eprintln!("skipped: needs root");
        return None;
    }
    Some(scratch(name))
}

/// Asserts that `out` is a clean failure: a non-zero exit and no panic. Returns stderr.
pub fn failed_cleanly(what: &str, out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{what} succeeded: {stderr}");
    assert_ne!(out.status.code(), Some(101), "{what} panicked: {stderr}");
    assert!(!stderr.contains("panicked"), "{what} panicked: {stderr}");
    stderr
}

/// Asserts that `out` failed cleanly with exactly one line on stderr that mentions an
/// error. Returns that line.
pub fn one_error_line(what: &str, out: &Output) -> String {
    let stderr = failed_cleanly(what, out);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{what}: expected one error line: {stderr}");
    errors[0].to_string()
}

/// Runs `cmd`, which must fail cleanly with one error line; returns that line.
pub fn fails(cmd: &mut Command) -> String {
    let what = format!("{cmd:?}");
    one_error_line(&what, &cmd.output().expect("run the command"))
}

/// Runs `cmd`, which must succeed; returns its output.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run the command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// Sends `signo` to `child`.
pub fn signal(child: &Child, signo: i32) {
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill() with a pid we spawned and have not reaped.
    unsafe { libc::kill(pid, signo) };
}

/// The next line `reader` gives (empty at its end).
pub fn next_line(reader: &mut impl BufRead) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line
}

/// A tiny ELF guest in `dir` that prints `message`, marks boot done and spins.
pub fn spin_kernel_saying(dir: &Path, message: &str) -> PathBuf {
    use kiln_tests::tiny_kernel::{build_with, End};
    let path = dir.join("spin.elf");
    std::fs::write(&path, build_with(message, End::Spin)).unwrap();
    path
}

/// A tiny ELF guest in `dir` that prints `message`, marks boot done and resets.
pub fn tiny_kernel(dir: &Path, message: &str) -> PathBuf {
    let path = dir.join("tiny.elf");
    std::fs::write(&path, kiln_tests::tiny_kernel::build(message)).unwrap();
    path
}

/// One `KEY:` field of `/proc/PID/status` (`status`), its words joined by single spaces.
pub fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
