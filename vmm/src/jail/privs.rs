//! In the jail's first process, once its root is the jail: limits, fds, capabilities and
//! ids, then the `execve` of `/kiln`. Prepared in the parent ([`Exec`]).

use std::convert::Infallible;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use super::ns::{check, StepError};
use super::{JailError, JailSpec};
use crate::net::INHERITED_TAPS_ENV;

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets in two 32-bit halves.
const CAP_VERSION_3: u32 = 0x2008_0522;
/// `CLOSE_RANGE_CLOEXEC`: mark the fds close-on-exec instead of closing them now.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The inner kiln's `execve`, and the limits and ids to take on before it.
pub(super) struct Exec {
    argv: Vec<CString>,
    envp: Vec<CString>,
    uid: u32,
    gid: u32,
    max_fds: u64,
    max_file_bytes: u64,
    /// Fds that stay open across the execve (the attached TAPs).
    inherit: Vec<RawFd>,
}

impl Exec {
    /// `taps`: the attached TAPs to hand over, by name.
    pub(super) fn new(spec: &JailSpec, taps: &[(String, File)]) -> Result<Exec, JailError> {
        let cstring = |s: String| {
            CString::new(s)
                .map_err(|e| JailError::Child(format!("an argument holds a NUL byte: {e}")))
        };
        let argv = std::iter::once("kiln".to_string())
            .chain(spec.args.iter().cloned())
            .map(cstring)
            .collect::<Result<Vec<_>, _>>()?;
        // No /tmp in the jail: kiln job makes its runtime directory in TMPDIR, the root
        // (owned by the jail's uid).
        let mut env = vec!["PATH=/".to_string(), "TMPDIR=/".to_string()];
        for key in ["KILN_LOG", "RUST_BACKTRACE"] {
            if let Ok(v) = std::env::var(key) {
                env.push(format!("{key}={v}"));
            }
        }
        if !spec.images.is_empty() {
            env.push(format!(
                "{}={}",
                crate::image::store::STORE_ENV,
                super::JAIL_IMAGE_STORE
            ));
        }
        if !taps.is_empty() {
            let list: Vec<String> = taps
                .iter()
                .map(|(name, file)| format!("{name}={}", file.as_raw_fd()))
                .collect();
            env.push(format!("{INHERITED_TAPS_ENV}={}", list.join(",")));
        }
        let envp = env
            .into_iter()
            .map(cstring)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Exec {
            argv,
            envp,
            uid: spec.uid,
            gid: spec.gid,
            max_fds: spec.max_fds,
            max_file_bytes: spec.max_file_bytes,
            inherit: taps.iter().map(|(_, file)| file.as_raw_fd()).collect(),
        })
    }

    /// Limits, fds, capabilities, ids, then `execve("/kiln")`; returns only on failure.
    pub(super) fn run(&self) -> Result<Infallible, StepError> {
        for (resource, limit, what) in [
            (libc::RLIMIT_NOFILE, self.max_fds, "set RLIMIT_NOFILE"),
            (libc::RLIMIT_FSIZE, self.max_file_bytes, "set RLIMIT_FSIZE"),
            (libc::RLIMIT_CORE, 0, "set RLIMIT_CORE"),
        ] {
            let rlim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: rlim is a valid rlimit for the call to read.
            check(what, unsafe { libc::setrlimit(resource, &rlim) })?;
        }
        // SAFETY: close_range takes no pointers; with CLOEXEC it only sets flags, so the
        // error pipe stays open until the execve.
        let r =
            unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) };
        if r != 0 {
            close_each_above_2(self.max_fds);
        }
        for &fd in &self.inherit {
            // SAFETY: fcntl with integer arguments; the fd is an attached TAP we hold open.
            check("keep a TAP open for the VMM", unsafe {
                libc::fcntl(fd, libc::F_SETFD, 0)
            })?;
        }
        drop_bounding_set()?;
        // SAFETY: prctl with integer arguments only.
        check("clear the ambient capabilities", unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        })?;
        // SAFETY: an empty group list: a null pointer with length 0.
        check("setgroups([])", unsafe {
            libc::setgroups(0, std::ptr::null())
        })?;
        // SAFETY: integer arguments only.
        check("setresgid", unsafe {
            libc::setresgid(self.gid, self.gid, self.gid)
        })?;
        // SAFETY: integer arguments only. Without SECBIT_KEEP_CAPS, leaving uid 0 for
        // all three uids clears the permitted and effective capability sets.
        check("setresuid", unsafe {
            libc::setresuid(self.uid, self.uid, self.uid)
        })?;
        // After the uid change, which clears it: if `kiln jail` dies, so does the VMM (and
        // with it the jail's namespaces). It survives the execve of /kiln.
        // SAFETY: integer arguments only.
        check("set the parent-death signal", unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0)
        })?;
        let mut header = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        // SAFETY: header and data are the v3 layout capset reads.
        let r = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_mut_ptr()) };
        check(
            "clear the capability sets (capset)",
            i32::from(r != 0).wrapping_neg(),
        )?;
        // SAFETY: header and data are the v3 layout capget writes.
        let r = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
        check(
            "read the capability sets (capget)",
            i32::from(r != 0).wrapping_neg(),
        )?;
        if data
            .iter()
            .any(|d| d.effective != 0 || d.permitted != 0 || d.inheritable != 0)
        {
            return Err(StepError::CapabilitiesRemain);
        }
        // SAFETY: integer arguments only.
        check("set no_new_privs", unsafe {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        })?;
        let (argv, envp) = (null_terminated(&self.argv), null_terminated(&self.envp));
        // SAFETY: argv and envp are null-terminated arrays of NUL-terminated strings that
        // live until the call (which does not return on success).
        unsafe { libc::execve(c"/kiln".as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        Err(StepError::Sys {
            what: "execve /kiln",
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Pointers to `strings` and a null after them: an `argv` or `envp` for execve, valid while
/// `strings` lives.
fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Drops every capability from the bounding set (until the kernel's last one, where
/// PR_CAPBSET_DROP says EINVAL).
fn drop_bounding_set() -> Result<(), StepError> {
    for cap in 0..64 {
        // SAFETY: integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) && cap > 0 {
                return Ok(());
            }
            return Err(StepError::BoundingSet { cap, source: e });
        }
    }
    Ok(())
}

/// Without close_range (Linux < 5.11): mark each fd from 3 up close-on-exec.
fn close_each_above_2(max: u64) {
    for fd in 3..i32::try_from(max).unwrap_or(4096) {
        // SAFETY: fcntl on an fd number; a closed one just says EBADF.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}
