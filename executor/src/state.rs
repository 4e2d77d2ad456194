//! A job's state directory (`<state_dir>/job-<id>/`) and the VM recorded in it.
//!
//! The id is GitLab's job id from the job response file (`crate::identity`), never a job
//! variable. Files: `owner` (SHA-256 of the job token: every later call must hold the same
//! token), `slot` (the job's concurrency slot, for the log), `vsock.sock` and `api.sock` (the
//! VM's; links into the jail's root when the VM is jailed), `kiln.pid` (`<pid> <start
//! time>`: the detached `kiln` process and its start time in clock ticks, so that a reused
//! pid is never signalled), `kiln.log` (kiln's stdout and stderr), `console.log` (the
//! guest's serial console), `store-image` (the kiln store image the VM boots from, if any).

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::identity::Identity;

/// Longest Unix socket path (sun_path is 108 bytes, with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;
/// The file holding the hash of the job token that owns a job directory.
const OWNER_FILE: &str = "owner";
const SLOT_FILE: &str = "slot";
const STORE_IMAGE_FILE: &str = "store-image";
const JAIL_ROOT_FILE: &str = "jail-root";

/// One job's state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDir {
    pub dir: PathBuf,
}

/// Whether a job directory belongs to the calling job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// There is no directory.
    Absent,
    /// It holds this job's token hash.
    Ours,
    /// It holds another token's hash, or none.
    Foreign,
}

impl JobDir {
    /// `<state_dir>/job-<job id>`.
    pub fn for_job(state_dir: &Path, identity: &Identity) -> Result<JobDir> {
        let job = JobDir {
            dir: state_dir.join(format!("job-{}", identity.job_id)),
        };
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

    /// Whether the directory is there and whose it is.
    pub fn ownership(&self, identity: &Identity) -> Ownership {
        match std::fs::read_to_string(self.dir.join(OWNER_FILE)) {
            Ok(owner) if owner.trim() == identity.token_hash => Ownership::Ours,
            Ok(_) => Ownership::Foreign,
            Err(_) if !self.dir.exists() => Ownership::Absent,
            Err(_) => Ownership::Foreign,
        }
    }

    /// Fails unless the directory exists and belongs to the job holding this token: `run`
    /// and `cleanup` act only on their own job's VM.
    pub fn check_owner(&self, identity: &Identity) -> Result<()> {
        match self.ownership(identity) {
            Ownership::Ours => Ok(()),
            Ownership::Absent => bail!(
                "job {} has no state in {} (did prepare succeed?)",
                identity.job_id,
                self.dir.display()
            ),
            Ownership::Foreign => bail!("{}", self.foreign(identity)),
        }
    }

    /// The message for a directory that another job's token owns.
    pub fn foreign(&self, identity: &Identity) -> String {
        format!(
            "the state directory {} of job {} belongs to another job token: refusing to \
             touch it (two GitLab instances with one state_dir, or a forged job response?)",
            self.dir.display(),
            identity.job_id
        )
    }

    /// Creates the directory (mode 0700, parents as needed) with its owner file in one
    /// step: it is made under a temporary name and renamed into place, so a job directory
    /// never exists without its owner, and an existing one is never replaced.
    pub fn create(&self, identity: &Identity) -> Result<()> {
        let parent = self
            .dir
            .parent()
            .context("the job directory has no parent")?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(|| format!("cannot create the state dir {}", parent.display()))?;
        let name = self.dir.file_name().unwrap_or_default().to_string_lossy();
        let tmp = parent.join(format!(".new-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .with_context(|| format!("cannot create the job state dir {}", tmp.display()))?;
        let made = std::fs::write(tmp.join(OWNER_FILE), format!("{}\n", identity.token_hash))
            .context("cannot write the job's owner file")
            .and_then(|()| {
                // rename(2) onto an existing non-empty directory fails: never replaces one.
                std::fs::rename(&tmp, &self.dir).with_context(|| {
                    format!("cannot create the job state dir {}", self.dir.display())
                })
            });
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        made
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

    /// Records how the VM is started: its slot, the store image it boots (which a snapshot
    /// of it must name), and for a jailed VM the jail's root, with links to the sockets
    /// and console that the VM makes there.
    pub fn record_launch(
        &self,
        slot: u32,
        store_image: Option<&str>,
        jail_root: Option<&Path>,
    ) -> Result<()> {
        let write = |name: &str, text: &str| {
            let path = self.dir.join(name);
            std::fs::write(&path, format!("{text}\n"))
                .with_context(|| format!("cannot write {}", path.display()))
        };
        write(SLOT_FILE, &slot.to_string())?;
        if let Some(image) = store_image {
            write(STORE_IMAGE_FILE, image)?;
        }
        if let Some(root) = jail_root {
            let root = root.to_str().context("the jail's root is not UTF-8")?;
            write(JAIL_ROOT_FILE, root)?;
            for link in [self.vsock(), self.api(), self.console()] {
                let name = link.file_name().unwrap_or_default();
                std::os::unix::fs::symlink(Path::new(root).join(name), &link)
                    .with_context(|| format!("cannot link {}", link.display()))?;
            }
        }
        Ok(())
    }

    /// The job's slot, as recorded at prepare.
    pub fn slot(&self) -> Option<u32> {
        self.read(SLOT_FILE)?.parse().ok()
    }

    /// The store image the VM boots, if it boots one.
    pub fn store_image(&self) -> Option<String> {
        self.read(STORE_IMAGE_FILE)
    }

    /// The jail's root on the host, if the VM is jailed.
    pub fn jail_root(&self) -> Option<PathBuf> {
        self.read(JAIL_ROOT_FILE).map(PathBuf::from)
    }

    fn read(&self, name: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.dir.join(name)).ok()?;
        Some(text.trim().to_string()).filter(|t| !t.is_empty())
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

    /// Stops the VM and removes the directory, and the VM's jail directory if `kiln jail`
    /// could not (it was killed). Callers check the owner first.
    pub fn remove(&self) -> Result<Option<String>> {
        let stopped = self.stop_vm();
        if let Some(jail) = self.jail_root().as_deref().and_then(Path::parent) {
            match std::fs::remove_dir_all(jail) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", jail.display())),
            }
        }
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", self.dir.display())),
        }
        Ok(stopped)
    }
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
pub(crate) mod tests {
    use super::*;

    pub fn identity(job_id: u64, token: &str) -> Identity {
        Identity {
            job_id,
            project_id: 7,
            protected: false,
            token_hash: crate::identity::token_hash(token),
        }
    }

    #[test]
    fn job_dirs_are_keyed_by_the_job_id() {
        let j = JobDir::for_job(Path::new("/run/kg"), &identity(1234, "t")).unwrap();
        assert_eq!(j.dir, PathBuf::from("/run/kg/job-1234"));
        assert_eq!(j.vsock(), PathBuf::from("/run/kg/job-1234/vsock.sock"));
        let long = "/x".repeat(50);
        let err = JobDir::for_job(Path::new(&long), &identity(2, "t")).unwrap_err();
        assert!(err.to_string().contains("shorter state_dir"), "{err}");
    }

    #[test]
    fn job_dirs_belong_to_one_token() {
        let root = std::env::temp_dir().join(format!("kiln-gitlab-owner-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (mine, other) = (identity(5, "mine"), identity(5, "other"));
        let job = JobDir::for_job(&root, &mine).unwrap();
        assert_eq!(job.ownership(&mine), Ownership::Absent);
        assert!(job.check_owner(&mine).is_err());
        job.create(&mine).unwrap();
        assert_eq!(job.ownership(&mine), Ownership::Ours);
        job.check_owner(&mine).unwrap();
        assert_eq!(job.ownership(&other), Ownership::Foreign);
        let err = job.check_owner(&other).unwrap_err();
        assert!(err.to_string().contains("another job token"), "{err}");
        // The token itself is never written, only its hash.
        let owner = std::fs::read_to_string(job.dir.join(OWNER_FILE)).unwrap();
        assert!(
            !owner.contains("mine") && owner.trim().len() == 64,
            "{owner}"
        );
        // An existing directory is never replaced by another create.
        std::fs::write(job.dir.join("kiln.log"), "x").unwrap();
        assert!(job.create(&other).is_err());
        assert_eq!(job.ownership(&mine), Ownership::Ours);
        // A directory without an owner file is nobody's: not ours either.
        std::fs::remove_file(job.dir.join(OWNER_FILE)).unwrap();
        assert_eq!(job.ownership(&mine), Ownership::Foreign);
        // Nothing temporary is left beside it.
        let names: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["job-5"]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn process_liveness_and_identity() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(alive(me));
        assert!(start_time(me).is_some());
        let dir = std::env::temp_dir().join(format!("kiln-gitlab-state-{me}"));
        let job = JobDir { dir: dir.clone() };
        job.create(&identity(1, "t")).unwrap();
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
