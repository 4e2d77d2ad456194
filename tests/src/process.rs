//! Running a command with its output captured and a deadline enforced.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long to wait for the output pipe to close once the process group is gone.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What a captured run produced.
#[derive(Debug)]
pub struct Captured {
    /// stdout and stderr, interleaved as written (one pipe serves both).
    pub output: String,
    /// The exit status; `None` if the deadline passed and the process group was killed.
    pub status: Option<ExitStatus>,
    /// Wall time from spawn to exit (or to the kill).
    pub elapsed: Duration,
}

impl Captured {
    /// The last `max` bytes of the output (on a char boundary), for error messages.
    pub fn tail(&self, max: usize) -> &str {
        tail(&self.output, max)
    }
}

/// The last `max` bytes of `text`, cut at a char boundary.
pub fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// The exit code a shell would report: the code, or 128 + the signal that killed it.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Runs `cmd` in a process group of its own with stdin from /dev/null and stdout and stderr
/// into one pipe. Waits for it to exit, at most `timeout`; then kills the whole group (on
/// time or not, so that nothing it started in the background outlives the run). If the
/// calling thread dies first (the test process is killed), the child gets SIGKILL.
pub fn run_captured(mut cmd: Command, timeout: Duration) -> Result<Captured> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let (mut reader, writer) = std::io::pipe().context("creating a pipe")?;
    cmd.stdin(Stdio::null())
        .stdout(writer.try_clone().context("duplicating a pipe")?)
        .stderr(writer)
        .process_group(0);
    // The child leads a process group of its own, so a signal that kills the test does not
    // reach it: have the kernel kill it when the spawning thread (which waits for it) dies.
    // SAFETY: the closure runs between fork and exec and calls only prctl, which is
    // async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start {program}"))?;
    // The Command holds the pipe's write ends: drop them so the reader sees EOF.
    drop(cmd);
    let pgid = libc::pid_t::try_from(child.id()).context("child pid out of range")?;

    let (out_tx, out_rx) = mpsc::channel();
    thread::spawn(move || {
        let mut bytes = Vec::new();
        // On a read error, keep what was read: it is all there is.
        let _ = reader.read_to_end(&mut bytes);
        let _ = out_tx.send(bytes);
    });
    let (exit_tx, exit_rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = exit_tx.send(child.wait());
    });

    let status = match exit_rx.recv_timeout(timeout) {
        Ok(status) => Some(status.with_context(|| format!("waiting for {program}"))?),
        Err(RecvTimeoutError::Timeout) => None,
        Err(RecvTimeoutError::Disconnected) => bail!("lost the waiter thread of {program}"),
    };
    let elapsed = start.elapsed();
    // SAFETY: kill() with a negative pid signals the process group created for the child;
    // it touches no memory. ESRCH (the group is already gone) is expected and ignored.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    if status.is_none() {
        // The waiter thread reaps the killed child.
        let _ = exit_rx.recv();
    }
    let output = match out_rx.recv_timeout(DRAIN_TIMEOUT) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => format!(
            "<output of {program} unavailable: a process outside its process group kept the pipe open>"
        ),
    };
    Ok(Captured {
        output,
        status,
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[test]
    fn output_and_status_are_captured() {
        let run = run_captured(
            sh("echo out; echo err >&2; exit 3"),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(run.output, "out\nerr\n");
        assert_eq!(run.status.map(exit_code), Some(3));
    }

    #[test]
    fn the_deadline_kills_the_whole_group() {
        let start = Instant::now();
        // The background sleep holds the pipe too: it must die with the group.
        let run = run_captured(
            sh("echo started; sleep 60 & sleep 60"),
            Duration::from_millis(300),
        )
        .unwrap();
        assert!(run.status.is_none());
        assert_eq!(run.output, "started\n");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn background_leftovers_are_killed_after_exit() {
        let start = Instant::now();
        let run = run_captured(sh("sleep 60 & echo done"), Duration::from_secs(30)).unwrap();
        assert_eq!(run.status.map(exit_code), Some(0));
        assert_eq!(run.output, "done\n");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn tails_respect_char_boundaries() {
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("ab", 10), "ab");
        assert_eq!(tail("aé", 1), "");
    }
}
