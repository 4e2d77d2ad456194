//! Starting a process: fork, then in the child only async-signal-safe calls until `execve`.
//!
//! Not `std::process::Command`: its error path waits for the failed child itself, which
//! would race with the [reaper](super::reaper). Everything the child needs (paths, argv,
//! envp) is prepared before the fork; an exec failure travels back over a close-on-exec pipe.

use std::ffi::{c_char, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use super::reaper::{Child, Reaper};
use crate::protocol::ExecRequest;

/// The environment every process starts from (the kernel gives init almost nothing).
pub const DEFAULT_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
];

/// An open `cgroup.procs` (write-only) that every spawned process moves itself into, or -1.
static JOB_CGROUP_PROCS: AtomicI32 = AtomicI32::new(-1);

/// From now on every spawned process starts in the cgroup whose `cgroup.procs` is `procs`
/// (the guest's init puts jobs in a cgroup of their own). Best effort: a process whose move
/// fails (the cgroup was removed) starts where the agent is.
pub fn start_in_cgroup(procs: OwnedFd) {
    use std::os::fd::IntoRawFd;
    let old = JOB_CGROUP_PROCS.swap(procs.into_raw_fd(), Ordering::SeqCst);
    if old >= 0 {
        // SAFETY: `old` came from an OwnedFd handed over earlier and is closed only here.
        drop(unsafe { OwnedFd::from_raw_fd(old) });
    }
}

/// A checked, C-ready form of an [`ExecRequest`].
#[derive(Debug)]
pub struct Plan {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: CString,
    ids: Option<(libc::uid_t, libc::gid_t)>,
}

/// What the child gets as descriptors 0, 1 and 2: `None` keeps the agent's own.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stdio {
    /// Standard input.
    pub stdin: Option<RawFd>,
    /// Standard output.
    pub stdout: Option<RawFd>,
    /// Standard error.
    pub stderr: Option<RawFd>,
    /// Standard input is a terminal that becomes the process's controlling terminal.
    pub controlling_tty: bool,
}

/// Where in the child a failure happened, sent back with the errno (an index).
const STAGES: [&str; 6] = [
    "starting a new session",
    "setting up standard input/output",
    "taking the terminal as controlling terminal",
    "switching user",
    "changing to the working directory",
    "executing the program",
];
const STAGE_SETSID: u32 = 0;
const STAGE_STDIO: u32 = 1;
const STAGE_TTY: u32 = 2;
const STAGE_USER: u32 = 3;
const STAGE_CHDIR: u32 = 4;
const STAGE_EXEC: u32 = 5;

impl Plan {
    /// Checks `req` and resolves its program in `PATH`. The error says what is wrong.
    pub fn new(req: &ExecRequest) -> Result<Plan, String> {
        let Some(program) = req.argv.first() else {
            return Err("exec needs a program: argv is empty".into());
        };
        let mut env: Vec<(String, String)> = DEFAULT_ENV
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        for (k, v) in &req.env {
            if k.is_empty() || k.contains('=') {
                return Err(format!("bad environment variable name {k:?}"));
            }
            env.retain(|(old, _)| old != k);
            env.push((k.clone(), v.clone()));
        }
        let path_var = env.iter().find(|(k, _)| k == "PATH").map_or("", |(_, v)| v);
        let program = resolve(program, path_var)?;
        let cstr = |what: &str, s: String| {
            CString::new(s).map_err(|_| format!("{what} contains a NUL byte"))
        };
        let ids = match (req.uid, req.gid) {
            (None, None) => None,
            (uid, gid) => {
                let uid = uid.unwrap_or(0);
                Some((uid, gid.unwrap_or(uid)))
            }
        };
        Ok(Plan {
            program: cstr("the program path", program)?,
            argv: req
                .argv
                .iter()
                .map(|a| cstr("an argument", a.clone()))
                .collect::<Result<_, _>>()?,
            envp: env
                .into_iter()
                .map(|(k, v)| cstr("an environment variable", format!("{k}={v}")))
                .collect::<Result<_, _>>()?,
            cwd: cstr("cwd", req.cwd.clone().unwrap_or_else(|| "/".into()))?,
            ids,
        })
    }

    /// Starts the process in a session (and process group) of its own, registered with
    /// `reaper`; with `stdio.controlling_tty`, its stdin becomes the controlling terminal
    /// of its new session. Returns once the program is executing, or with why it could not
    /// start.
    pub fn spawn(&self, stdio: Stdio, reaper: &Reaper) -> io::Result<Child> {
        let argv = null_terminated(&self.argv);
        let envp = null_terminated(&self.envp);
        let (err_r, err_w) = pipe()?;
        let (child, ()) = reaper.spawn(|| {
            // SAFETY: the child runs only async-signal-safe calls on memory prepared before
            // the fork (see `child`), and ends in execve or _exit.
            match unsafe { libc::fork() } {
                -1 => Err(io::Error::last_os_error()),
                // SAFETY: this is the child of the fork above.
                0 => unsafe { self.child(stdio, &argv, &envp, err_w.as_raw_fd()) },
                pid => Ok((pid, ())),
            }
        })?;
        drop(err_w);
        let mut report = [0u8; 8];
        let got = read_full(&err_r, &mut report)?;
        if got == 0 {
            return Ok(child); // the pipe closed on exec: the program runs
        }
        // The child failed and exits; the reaper collects it and drops its status.
        let [s0, s1, s2, s3, e0, e1, e2, e3] = report;
        let stage = u32::from_le_bytes([s0, s1, s2, s3]);
        let errno = io::Error::from_raw_os_error(i32::from_le_bytes([e0, e1, e2, e3]));
        let what = match stage {
            STAGE_CHDIR => format!(
                "changing to the working directory {}",
                self.cwd.to_string_lossy()
            ),
            STAGE_EXEC => format!("executing {}", self.program.to_string_lossy()),
            _ => STAGES
                .get(usize::try_from(stage).unwrap_or(usize::MAX))
                .map_or("starting the process", |s| s)
                .to_owned(),
        };
        Err(io::Error::new(errno.kind(), format!("{what}: {errno}")))
    }

    /// The child side of the fork. Only async-signal-safe calls: the parent has other
    /// threads, whose locks (the allocator's among them) may be held forever in the child.
    ///
    /// # Safety
    ///
    /// Must run only in a freshly forked child; `argv` and `envp` are null-terminated
    /// arrays of pointers into `self`.
    unsafe fn child(
        &self,
        stdio: Stdio,
        argv: &[*const c_char],
        envp: &[*const c_char],
        err: RawFd,
    ) -> ! {
        // SAFETY: (the whole body) plain system calls on descriptors, and on NUL-terminated
        // strings that stay valid until execve; none of them allocates or takes a lock.
        unsafe {
            if libc::setsid() < 0 {
                fail(err, STAGE_SETSID);
            }
            // "0" in cgroup.procs moves the writer; the descriptor is close-on-exec.
            let procs = JOB_CGROUP_PROCS.load(Ordering::Relaxed);
            if procs >= 0 {
                libc::write(procs, c"0".as_ptr().cast(), 1);
            }
            // Move any source descriptor out of 0..=2 first, so no dup2 below clobbers
            // another one's source.
            let mut fds = [stdio.stdin, stdio.stdout, stdio.stderr];
            for fd in fds.iter_mut().flatten() {
                if *fd <= 2 {
                    *fd = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3);
                    if *fd < 0 {
                        fail(err, STAGE_STDIO);
                    }
                }
            }
            for (target, fd) in (0..).zip(fds) {
                if let Some(fd) = fd {
                    if libc::dup2(fd, target) < 0 {
                        fail(err, STAGE_STDIO);
                    }
                }
            }
            // The new session has no controlling terminal yet: the slave on 0 becomes it,
            // with this process group in the foreground.
            if stdio.controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                fail(err, STAGE_TTY);
            }
            if let Some((uid, gid)) = self.ids {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    fail(err, STAGE_USER);
                }
            }
            if libc::chdir(self.cwd.as_ptr()) != 0 {
                fail(err, STAGE_CHDIR);
            }
            // The agent ignores SIGPIPE; programs expect the default. Blocked signals
            // would be inherited across execve too.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            libc::execve(self.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            fail(err, STAGE_EXEC)
        }
    }
}

/// Reports `stage` and errno on `err` and exits the child.
///
/// # Safety
///
/// Only for the child of a fork.
unsafe fn fail(err: RawFd, stage: u32) -> ! {
    // SAFETY: __errno_location returns this thread's errno slot; write and _exit are
    // async-signal-safe and `report` lives across the call.
    unsafe {
        let errno = *libc::__errno_location();
        let mut report = [0u8; 8];
        report[..4].copy_from_slice(&stage.to_le_bytes());
        report[4..].copy_from_slice(&errno.to_le_bytes());
        libc::write(err, report.as_ptr().cast(), report.len());
        libc::_exit(127)
    }
}

fn null_terminated(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Finds `program` in `path_var` unless it names a path itself.
fn resolve(program: &str, path_var: &str) -> Result<String, String> {
    if program.contains('/') {
        return Ok(program.to_owned());
    }
    path_var
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .map(|p| p.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{program}: command not found (PATH={path_var})"))
}

/// A pipe whose both ends close on exec: `(read end, write end)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        // SAFETY: reads into `rest`, which is valid for `rest.len()` bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
        match n {
            0 => break,
            n if n > 0 => got += n.unsigned_abs(),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_programs_in_path() {
        assert_eq!(resolve("sh", "/nonexistent::/bin").unwrap(), "/bin/sh");
        assert_eq!(resolve("./x", "").unwrap(), "./x");
        let err = resolve("no-such-program-kiln", "/bin").unwrap_err();
        assert_eq!(err, "no-such-program-kiln: command not found (PATH=/bin)");
    }

    #[test]
    fn plans_check_their_request() {
        let err = Plan::new(&ExecRequest::new(Vec::<String>::new())).unwrap_err();
        assert!(err.contains("argv is empty"), "{err}");
        let err = Plan::new(&ExecRequest::new(["sh", "a\0b"])).unwrap_err();
        assert!(err.contains("NUL"), "{err}");
        let err = Plan::new(&ExecRequest::new(["sh"]).env("A=B", "c")).unwrap_err();
        assert!(err.contains("bad environment variable name"), "{err}");
        let plan = Plan::new(&ExecRequest::new(["sh"]).env("PATH", "/usr/bin:/bin")).unwrap();
        assert!(plan
            .envp
            .iter()
            .any(|e| e.to_bytes() == b"PATH=/usr/bin:/bin"));
        assert_eq!(
            plan.envp
                .iter()
                .filter(|e| e.to_bytes().starts_with(b"PATH="))
                .count(),
            1
        );
    }
}
