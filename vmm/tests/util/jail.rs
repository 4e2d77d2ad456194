//! `kiln jail` in the tests: its command line, its one-line errors, and the pid line it
//! prints once the jailed VMM runs.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStderr, Command, Output};

/// `kiln jail --id ID --base BASE EXTRA -- INNER`.
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

/// Asserts a failure with exactly one line on stderr holding `needle`, exit code 1, and no
/// panic.
pub fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = super::failed_cleanly("kiln jail", out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(needle), "wanted {needle:?} in: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

/// What `kiln jail` printed up to its line "ID runs as pid P (uid U, gid G) with the root
/// R", read from `child`'s piped stderr: the words after "runs as pid " (P, "(uid", …),
/// everything read so far, and the rest of stderr to read on. Panics, after killing
/// `child`, if stderr ends before that line.
pub fn pid_line(child: &mut Child) -> (Vec<String>, String, BufReader<ChildStderr>) {
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 {
        seen.push_str(&line);
        if let Some(rest) = line.split("runs as pid ").nth(1) {
            let words = rest
                .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
                .filter(|w| !w.is_empty())
                .map(str::to_owned)
                .collect();
            return (words, seen, stderr);
        }
        line.clear();
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("no pid line: {seen}");
}
