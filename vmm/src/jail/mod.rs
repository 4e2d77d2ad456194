//! The jailer: `kiln jail --id ID [--uid U --gid G] [--file PATH]... -- <kiln args>` runs
//! one inner kiln (usually `run`, `job` or `restore`) confined to a directory of its own, in
//! namespaces of its own, as an unprivileged user with no capabilities.
//!
//! # What happens, in order
//!
//! In the outer `kiln jail` process (root, in the host's namespaces):
//!
//! 1. Checks: root, a valid ID (`[A-Za-z0-9_-]`, ≤ 64 bytes: it becomes the hostname), a
//!    non-root `--uid`/`--gid`, every `--file` present. Without `--uid`, the jail takes a uid
//!    of its own from `--uid-range START:COUNT` (default [`DEFAULT_UID_RANGE`]), held for its
//!    lifetime (`uids.rs`), and the gid of the same number unless `--gid` says otherwise.
//! 2. The jail directory `<base>/<ID>` (`--base`, else `$KILN_JAIL_BASE`, else
//!    `/srv/kiln`) is created with `mkdir`, which is atomic: an existing one is refused if
//!    its `jail.pid` names a live process (or is missing), and replaced if it is stale.
//! 3. `<base>/<ID>/root` (owned by uid:gid, mode 0755, but only once it is complete: until
//!    then root owns everything in it, so the jail's uid cannot plant a symlink for root to
//!    follow; copies are created with `O_EXCL | O_NOFOLLOW` and ownership is handed over
//!    last, bottom-up, with `lchown`) gets each `--file` under its file
//!    name (a directory recursively), hard-linked, or copied where a link is impossible
//!    (another filesystem), would not be readable by the jail's uid (the copy is then
//!    chowned: a hard link shares the inode, so the host's file is never chowned), or would
//!    be writable by it (the VMM must not be able to change the host's file); each
//!    `--image NAME` of the store likewise as `/images/NAME` (the inner kiln's store); and the
//!    running kiln binary as `/kiln`. A dynamically linked kiln (a debug build) also gets its
//!    loader and libraries, as `ldd` lists them, at their paths; the static kiln of a
//!    deployment needs none. An empty `dev` is the mount point of the jail's `/dev`.
//! 4. `unshare(CLONE_NEWPID)`, then `fork`: the child is PID 1 of a new PID namespace and
//!    becomes the VMM itself (no reaper: kiln starts no processes, and when it ends the
//!    namespace and everything in it end too). A close-on-exec pipe carries a set-up
//!    failure back as one line; EOF means the `execve` succeeded.
//!
//! In the child (see `ns.rs` and `privs.rs`):
//!
//! 5. `unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET)`; `/` made
//!    recursively private; the root bind-mounted onto itself `nosuid,nodev`; a small tmpfs
//!    on its `/dev` holding only `kvm` and, if the host has it, `net/tun` — made with
//!    `mknod` from the host nodes' device numbers and chowned to uid:gid (so the host's
//!    `/dev/kvm` keeps its owner), then remounted read-only. No `/proc`: kiln reads nothing
//!    there (host RAM comes from `sysconf`).
//! 6. `pivot_root(".", ".")` and a lazy unmount of the old root. Where the host's root is
//!    the initramfs (`rootfs` cannot be pivoted away from, as in the test bed), the root is
//!    moved over `/` with `MS_MOVE` and `chroot(".")` instead; the capabilities that could
//!    undo a chroot are gone before the VMM runs.
//! 7. `sethostname(ID)`; rlimits: `RLIMIT_NOFILE` (`--max-fds`, 4096), `RLIMIT_FSIZE`
//!    (`--max-file-gib`, 64 GiB), `RLIMIT_CORE` 0. No `RLIMIT_NPROC`: it counts every process
//!    of the uid host-wide; a cgroup slot's `pids.max` bounds the VMM's threads instead.
//! 8. Every fd above 2 made close-on-exec (`close_range(3, ~0, CLOSE_RANGE_CLOEXEC)`, so the
//!    error pipe lives until the `execve`), but for the attached TAPs of `--tap`; the capability bounding set and the ambient set
//!    cleared; `setgroups([])`, `setresgid`, `setresuid` to the unprivileged ids (which
//!    clears the permitted and effective sets), the inheritable set zeroed with `capset`, and
//!    `capget` checked to be all zero; `PR_SET_PDEATHSIG` = SIGKILL (a killed `kiln jail`
//!    takes its VMM along; its directory is then stale and replaced by the next jail of that
//!    ID); `PR_SET_NO_NEW_PRIVS`.
//! 9. `execve("/kiln", ["kiln", <args>...])` with the working directory `/` and an
//!    environment of `PATH=/`, `TMPDIR=/` (`kiln job` makes its
//!    socket directory there) plus `KILN_LOG` and `RUST_BACKTRACE` if set,
//!    `KILN_IMAGE_STORE=/images` with `--image`, and with
//!    `--tap`, `KILN_TAP_FDS` naming the attached TAP fds, which stay open (see below). Paths in the
//!    inner arguments are therefore relative to the jail root: `--vsock v.sock` is
//!    `<base>/<ID>/root/v.sock` on the host, which `kiln jail` prints.
//!    The inner kiln installs its seccomp filters after its own set-up, as always.
//!
//! # Networking
//!
//! `--tap NAME` (for the VM's `--net tap=NAME`) attaches to the host TAP in the outer
//! process, in the host's network namespace, and the VMM inherits only that open device.
//! The TAP is not moved into the jail: it keeps the host side `kiln net setup` gave it
//! (address, NAT), and the VMM's own network namespace holds nothing but a loopback that
//! is down, so even a subverted VMM reaches no network; it can only pass the guest's
//! frames, as it must.
//!
//! The outer process forwards SIGTERM and SIGINT to the VMM: they are blocked from its
//! checks until the forwarding thread runs, so none is missed; and since a namespace's
//! PID 1 receives only the signals it handles, each waits (up to 10 s, reading the VMM's
//! `SigCgt`/`SigBlk` in the host's /proc) until the inner kiln has its handlers. It
//! waits for it, removes `<base>/<ID>` unless `--keep`, and exits with the VMM's exit code
//! (128 + N if signal N killed it).

mod ns;
mod paths;
mod privs;
mod signals;
mod uids;

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use kiln_devices::virtio::net::Tap;
pub use paths::{host_paths, JailDir};
use signals::{forward_signals, SignalMask};
pub use uids::{UidLease, UidRange, DEFAULT_UID_RANGE};

/// The image store inside a jail that has `--image`s.
pub const JAIL_IMAGE_STORE: &str = "/images";
/// Where jail directories go unless `--base` or `$KILN_JAIL_BASE` says otherwise.
pub const DEFAULT_BASE: &str = "/srv/kiln";
/// The uid and gid the VMM runs as unless told otherwise ("nobody").
pub const DEFAULT_ID: u32 = 65534;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("kiln jail must run as root (it makes namespaces, mounts and device nodes, then drops to --uid/--gid); run it with sudo or as root")]
    NotRoot,
    #[error("jail ID {0:?} is not valid: use 1 to 64 letters, digits, '-' or '_'")]
    BadId(String),
    #[error("--{0} 0 would leave the VMM root: give the unprivileged id it should run as")]
    RootIds(&'static str),
    #[error("--file {}: {source}", path.display())]
    MissingFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "two --file arguments have the file name {0:?}; the jail holds each under its file name"
    )]
    DuplicateName(String),
    #[error("jail ID {id:?} is taken: {} is in use{}; pick another ID, or remove the directory if no jail uses it", dir.display(), pid.map(|p| format!(" by kiln jail pid {p}")).unwrap_or_default())]
    Taken {
        id: String,
        dir: PathBuf,
        pid: Option<i32>,
    },
    #[error("cannot create the jail directory {}: {source} (is the base writable? choose one with --base or KILN_JAIL_BASE)", path.display())]
    Base {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot {0}: {1}")]
    Sys(&'static str, std::io::Error),
    #[error("every uid of the range {start}:{count} is held by a running jail; wait for one to end or give a larger --uid-range")]
    NoFreeUid { start: u32, count: u32 },
    #[error("setting up the jail failed: {0}")]
    Child(String),
    /// Shown with its source (the TAP's error) after it.
    #[error("--tap")]
    Tap(#[from] kiln_devices::virtio::net::TapError),
}

/// Everything the jailer needs to know.
#[derive(Debug, Clone)]
pub struct JailSpec {
    pub id: String,
    /// The VMM's uid, unless `uid_range` is given.
    pub uid: u32,
    pub gid: u32,
    /// Take a uid of the jail's own from this range instead of `uid` (see `uids.rs`).
    pub uid_range: Option<UidRange>,
    /// With `uid_range`: the gid is the number of the uid taken, not `gid`.
    pub gid_from_uid: bool,
    pub base: PathBuf,
    pub files: Vec<PathBuf>,
    /// Image directories of the host's store, placed under `/images` (the inner kiln's
    /// store, [`JAIL_IMAGE_STORE`]) under their names.
    pub images: Vec<PathBuf>,
    /// Host TAPs to hand the VMM attached (see [`crate::net::INHERITED_TAPS_ENV`]).
    pub taps: Vec<String>,
    /// The kiln binary to run inside (normally the running one).
    pub kiln: PathBuf,
    /// The inner kiln's arguments (without the program name).
    pub args: Vec<String>,
    pub keep: bool,
    pub max_fds: u64,
    pub max_file_bytes: u64,
}

impl JailSpec {
    /// Checks what can be checked before anything is created, in the order a user would
    /// fix things: privileges, the ID and ids, then the files.
    pub fn check(&self) -> Result<(), JailError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(JailError::NotRoot);
        }
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 64
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !id_ok {
            return Err(JailError::BadId(self.id.clone()));
        }
        if self.uid == 0 && self.uid_range.is_none() {
            return Err(JailError::RootIds("uid"));
        }
        if self.gid == 0 && !(self.gid_from_uid && self.uid_range.is_some()) {
            return Err(JailError::RootIds("gid"));
        }
        for path in &self.files {
            std::fs::metadata(path).map_err(|source| JailError::MissingFile {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// A started jail: the VMM's pid (in the host's PID namespace) and its directory.
#[derive(Debug)]
pub struct Jail {
    pub pid: libc::pid_t,
    pub dir: JailDir,
    /// The ids the VMM runs as.
    pub uid: u32,
    pub gid: u32,
    reaped: bool,
    /// The jail's own uid, held until the VMM is reaped and the directory removed (fields
    /// drop after [`Drop::drop`], in order: the directory, then this).
    _lease: Option<UidLease>,
}

impl Drop for Jail {
    /// A jail given up before its VMM ended (an error in the outer process): the VMM is
    /// killed and reaped before its directory goes.
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: kill takes no pointers; pid is our unreaped child.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let _ = self.wait();
        }
    }
}

impl Jail {
    /// Checks `spec`, builds the jail directory, starts the VMM in it and returns once the
    /// VMM's `execve` succeeded (or with the set-up step that failed).
    pub fn start(spec: &JailSpec) -> Result<Jail, JailError> {
        spec.check()?;
        // SIGINT/SIGTERM wait (blocked) until the thread that forwards them runs, so that
        // none leaves the jail directory behind; the child unblocks them before its execve.
        let mask = SignalMask::block();
        let dir = JailDir::create(&spec.base, &spec.id, spec.keep)?;
        let mut spec = spec.clone();
        let lease = match spec.uid_range {
            Some(range) => {
                let lease = UidLease::take(&spec.base, range)?;
                spec.uid = lease.uid;
                if spec.gid_from_uid {
                    spec.gid = lease.uid;
                }
                Some(lease)
            }
            None => None,
        };
        let spec = &spec;
        dir.populate(spec)?;
        let plan = ns::Plan::new(spec, &dir)?;
        // Attached here, in the host's network namespace; the child keeps the fds open
        // across its execve, and this process closes its copies once the child exists.
        let taps = spec
            .taps
            .iter()
            .map(|name| Ok((name.clone(), Tap::open(name)?.into_file())))
            .collect::<Result<Vec<_>, JailError>>()?;
        let exec = privs::Exec::new(spec, &taps)?;
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array we own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(JailError::Sys(
                "make a pipe",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: both fds were just created and are owned by nothing else.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: clone without CLONE_VM and with a null stack is fork, with the child in
        // a new PID namespace (as its PID 1). This process is single-threaded here (the
        // signal thread starts later), so the child may run any code; it ends in execve or
        // _exit and never returns. (unshare(CLONE_NEWPID) + fork would leave this process
        // unable to start threads.)
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                libc::c_ulong::try_from(libc::CLONE_NEWPID | libc::SIGCHLD).unwrap_or(0),
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        let pid = libc::pid_t::try_from(pid).unwrap_or(-1);
        if pid < 0 {
            return Err(JailError::Sys("fork", std::io::Error::last_os_error()));
        }
        if pid == 0 {
            drop(read_end);
            mask.restore();
            let err = match plan.enter().and_then(|()| exec.run()) {
                Err(e) => e,
                Ok(never) => match never {},
            };
            let mut file = std::fs::File::from(write_end);
            let _ = std::io::Write::write_all(&mut file, err.to_string().as_bytes());
            // SAFETY: _exit ends the child without running the parent's destructors (the
            // jail directory's guard belongs to the parent).
            unsafe { libc::_exit(127) };
        }
        drop(write_end);
        drop(taps);
        let mut message = String::new();
        let _ = std::fs::File::from(read_end).read_to_string(&mut message);
        let jail = Jail {
            pid,
            dir,
            uid: spec.uid,
            gid: spec.gid,
            reaped: false,
            _lease: lease,
        };
        let forwarding = if message.is_empty() {
            forward_signals(pid)
        } else {
            Err(JailError::Child(message))
        };
        forwarding?; // on an error, dropping the jail kills and reaps the child
        drop(mask);
        Ok(jail)
    }

    /// Waits for the VMM; returns its exit code, or 128 + N if signal N killed it.
    pub fn wait(&mut self) -> Result<u8, JailError> {
        let mut status = 0;
        loop {
            // SAFETY: status is ours to write; pid is our child.
            let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if r == self.pid {
                self.reaped = true;
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(JailError::Sys("wait for the jailed kiln", e));
            }
        }
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else if libc::WIFSIGNALED(status) {
            128 + libc::WTERMSIG(status)
        } else {
            1
        };
        Ok(u8::try_from(code).unwrap_or(1))
    }
}

/// A NUL-terminated copy of a path (paths never hold NUL bytes).
fn cpath(path: &std::path::Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Io {
        what: "use the path",
        path: path.to_owned(),
        source: std::io::ErrorKind::InvalidInput.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        let spec = |id: &str| JailSpec {
            id: id.into(),
            uid: 1000,
            gid: 1000,
            uid_range: None,
            gid_from_uid: false,
            base: "/nonexistent".into(),
            files: vec![],
            images: vec![],
            taps: vec![],
            kiln: "/bin/true".into(),
            args: vec![],
            keep: false,
            max_fds: 4096,
            max_file_bytes: 1 << 30,
        };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(matches!(spec("ok").check(), Err(JailError::NotRoot)));
            return;
        }
        assert!(spec("job-1_a").check().is_ok());
        for bad in ["", "a/b", "..", &"x".repeat(65)] {
            assert!(
                matches!(spec(bad).check(), Err(JailError::BadId(_))),
                "{bad:?}"
            );
        }
        let mut s = spec("ok");
        s.uid = 0;
        assert!(matches!(s.check(), Err(JailError::RootIds("uid"))));
    }
}
