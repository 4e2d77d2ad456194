//! A job's state directory (`<state_dir>/runner-<id>/job-<id>/`) and the VM recorded in it.
//!
//! Files: `vsock.sock` and `api.sock` (the VM's), `kiln.pid` (`<pid> <start time>`: the
//! detached `kiln` process and its start time in clock ticks, so that a reused pid is never
//! signalled), `kiln.log` (kiln's stdout and stderr), `console.log` (the guest's serial
//! console).

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::contract::Contract;

/// Longest Unix socket path (sun_path is 108 bytes, with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// One job's state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDir {
    pub dir: PathBuf,
}

impl JobDir {
    /// `<state_dir>/runner-<CI_RUNNER_ID>/job-<CI_JOB_ID>`; both ids must be present and
    /// plain (digits, letters, `-`, `_`, `.`) since they become path components.
    pub fn for_job(state_dir: &Path, contract: &Contract) -> Result<JobDir> {
        let id = |key: &str| -> Result<String> {
            let value = contract.var(key).with_context(|| {
                format!("CUSTOM_ENV_{key} is not set: kiln-gitlab must be run by GitLab Runner's custom executor")
            })?;
            check_component(key, value)?;
            Ok(value.to_string())
        };
        let dir = state_dir
            .join(format!("runner-{}", id("CI_RUNNER_ID")?))
            .join(format!("job-{}", id("CI_JOB_ID")?));
        let job = JobDir { dir };
        let longest = job.vsock().as_os_str().len() + "_4294967295".len();
        if longest > MAX_SOCKET_PATH {
            bail!(
                "the job's socket paths under {} would pass the {MAX_SOCKET_PATH}-byte limit of \
                 Unix sockets; set a shorter state_dir",
                job.dir.display()
            );
        }
        Ok(job)
    }

    pub fn vsock(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
    pub fn api(&self) -> PathBuf {
        self.dir.join("api.sock")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("kiln.pid")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("kiln.log")
    }
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Creates the directory (mode 0700, parents as needed).
    pub fn create(&self) -> Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("cannot create the job state dir {}", self.dir.display()))
    }

    pub fn exists(&self) -> bool {
        self.dir.exists()
    }

    /// Records the VM process.
    pub fn write_pid(&self, pid: i32) -> Result<()> {
        let start = start_time(pid).unwrap_or(0);
        std::fs::write(self.pid_file(), format!("{pid} {start}\n"))
            .with_context(|| format!("cannot write {}", self.pid_file().display()))
    }

    /// The recorded VM process, if it still runs (a zombie, or another process that got
    /// the pid since, does not count).
    pub fn running_vm(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.pid_file()).ok()?;
        let mut fields = text.split_whitespace();
        let pid: i32 = fields.next()?.parse().ok()?;
        let start: u64 = fields.next()?.parse().ok()?;
        (pid > 0 && alive(pid) && (start == 0 || start_time(pid) == Some(start))).then_some(pid)
    }

    /// The last `max` bytes of kiln's log.
    pub fn log_tail(&self, max: u64) -> String {
        let Ok(mut f) = std::fs::File::open(self.log()) else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
        let mut text = String::new();
        let _ = f.read_to_string(&mut text);
        text
    }

    /// Stops the recorded VM: the API's shutdown, then SIGTERM, then SIGKILL, each
    /// bounded. Returns how it ended, for the log. Never fails: a VM that is already gone
    /// is fine.
    pub fn stop_vm(&self) -> Option<String> {
        let pid = self.running_vm()?;
        if api_shutdown(&self.api()).is_ok() && wait_gone(pid, Duration::from_secs(5)) {
            return Some(format!("stopped the VM (pid {pid}) through its API"));
        }
        for (signo, name, wait) in [
            (libc::SIGTERM, "SIGTERM", Duration::from_secs(3)),
            (libc::SIGKILL, "SIGKILL", Duration::from_secs(5)),
        ] {
            if self.running_vm() != Some(pid) {
                return Some(format!("the VM (pid {pid}) ended"));
            }
            // SAFETY: kill(2) with a pid we checked is still our recorded kiln process.
            unsafe { libc::kill(pid, signo) };
            if wait_gone(pid, wait) {
                return Some(format!("stopped the VM (pid {pid}) with {name}"));
            }
        }
        Some(format!("the VM (pid {pid}) did not end even after SIGKILL"))
    }

    /// Stops the VM and removes the directory, and the runner's directory if that is now
    /// empty.
    pub fn remove(&self) -> Result<Option<String>> {
        let stopped = self.stop_vm();
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", self.dir.display())),
        }
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent); // fails while other jobs of the runner run
        }
        Ok(stopped)
    }
}

fn check_component(key: &str, value: &str) -> Result<()> {
    let ok = !value.starts_with('.')
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("CUSTOM_ENV_{key}={value:?} is not a plain id (letters, digits, - _ .)");
    }
    Ok(())
}

/// Sends `{"cmd":"shutdown"}` to the VM's control API.
pub fn api_shutdown(api: &Path) -> Result<()> {
    api_call(
        api,
        &serde_json::json!({"cmd": "shutdown"}),
        Duration::from_secs(3),
    )
    .map(drop)
}

/// One request to the VM's control API (newline-delimited JSON); an `"ok":false` response
/// is an error with its message.
pub fn api_call(
    api: &Path,
    request: &serde_json::Value,
    timeout: Duration,
) -> Result<serde_json::Value> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = UnixStream::connect(api)
        .with_context(|| format!("cannot reach the VM's API socket {}", api.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .with_context(|| format!("no answer from the VM's API within {timeout:?}"))?;
    let response: serde_json::Value = serde_json::from_str(line.trim())
        .with_context(|| format!("the VM's API answered {line:?}"))?;
    if response["ok"] != true {
        bail!(
            "the VM refused {}: {}",
            request["cmd"],
            response["error"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(response)
}

/// True if any thread of process `pid` is still running: neither gone nor a zombie (a
/// process whose main thread has exited shows as a zombie while its other threads, e.g. a
/// vCPU thread releasing guest memory, still run).
pub fn alive(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            stat_fields(&stat).is_some_and(|f| !matches!(f.first(), Some(&"Z" | &"X")))
        })
    })
}

/// The process's start time (clock ticks after boot), field 22 of `/proc/<pid>/stat`.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&stat)?.get(19)?.parse().ok()
}

/// The fields after the command name (which may hold spaces and parentheses): state first.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().collect())
}

/// Waits up to `timeout` for `pid` to end; true if it did.
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        // Polling a process that is not our child: there is nothing to wait on.
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contract(runner: &str, job: &str) -> Contract {
        Contract::from_vars([
            ("CUSTOM_ENV_CI_RUNNER_ID".to_string(), runner.to_string()),
            ("CUSTOM_ENV_CI_JOB_ID".to_string(), job.to_string()),
        ])
    }

    #[test]
    fn job_dirs_are_keyed_by_runner_and_job() {
        let j = JobDir::for_job(Path::new("/run/kg"), &contract("7", "1234")).unwrap();
        assert_eq!(j.dir, PathBuf::from("/run/kg/runner-7/job-1234"));
        assert_eq!(
            j.vsock(),
            PathBuf::from("/run/kg/runner-7/job-1234/vsock.sock")
        );
        for bad in ["../x", "a/b", ".", "", "x y"] {
            assert!(
                JobDir::for_job(Path::new("/r"), &contract("1", bad)).is_err(),
                "{bad:?}"
            );
        }
        let long = "/x".repeat(50);
        let err = JobDir::for_job(Path::new(&long), &contract("1", "2")).unwrap_err();
        assert!(err.to_string().contains("shorter state_dir"), "{err}");
        assert!(JobDir::for_job(Path::new("/r"), &Contract::default()).is_err());
    }

    #[test]
    fn process_liveness_and_identity() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(alive(me));
        assert!(start_time(me).is_some());
        let dir = std::env::temp_dir().join(format!("kiln-gitlab-state-{me}"));
        let job = JobDir { dir: dir.clone() };
        job.create().unwrap();
        job.write_pid(me).unwrap();
        assert_eq!(job.running_vm(), Some(me));
        // The same pid with another start time is another process.
        std::fs::write(job.pid_file(), format!("{me} 1\n")).unwrap();
        assert_eq!(job.running_vm(), None);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(stat_fields("1 (a) b) S 0 1").unwrap().first() == Some(&"S"));
    }

    #[test]
    fn zombies_are_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        // Not reaped yet: a zombie once it has exited.
        assert!(wait_gone(pid, Duration::from_secs(10)), "true did not end");
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        child.wait().unwrap();
        assert!(!alive(pid));
    }
}
