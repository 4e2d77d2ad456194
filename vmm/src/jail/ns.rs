//! In the jail's first process (PID 1 of its PID namespace): the other namespaces, the
//! mounts, `/dev`, and the switch of root. Everything is prepared in the parent ([`Plan`])
//! so that the child only makes system calls.

use std::ffi::CString;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::{cpath, JailDir, JailError, JailSpec};

/// A device node to make in the jail's `/dev`.
struct Node {
    /// Its path below the jail root's `dev`, e.g. `net/tun`.
    path: CString,
    /// Its directory, to create first (`dev/net`), if any.
    dir: Option<CString>,
    rdev: libc::dev_t,
}

/// What the child does to enter its jail.
pub(super) struct Plan {
    root: CString,
    dev: CString,
    nodes: Vec<Node>,
    hostname: String,
    uid: u32,
    gid: u32,
}

impl Plan {
    pub(super) fn new(spec: &JailSpec, dir: &JailDir) -> Result<Plan, JailError> {
        let dev = dir.root.join("dev");
        let mut nodes = Vec::new();
        for (host, name) in [("/dev/kvm", "kvm"), ("/dev/net/tun", "net/tun")] {
            let meta = std::fs::metadata(host)
                .ok()
                .filter(|m| m.file_type().is_char_device());
            let meta = match meta {
                Some(m) => m,
                None if name == "kvm" => {
                    return Err(JailError::Io {
                        what: "find the character device",
                        path: host.into(),
                        source: std::io::ErrorKind::NotFound.into(),
                    })
                }
                None => continue, // no /dev/net/tun: the VM gets no TAP device anyway
            };
            let path = dev.join(name);
            let dir = match Path::new(name).parent() {
                Some(p) if !p.as_os_str().is_empty() => Some(cpath(&dev.join(p))?),
                _ => None,
            };
            nodes.push(Node {
                path: cpath(&path)?,
                dir,
                rdev: meta.rdev(),
            });
        }
        Ok(Plan {
            root: cpath(&dir.root)?,
            dev: cpath(&dev)?,
            nodes,
            hostname: spec.id.clone(),
            uid: spec.uid,
            gid: spec.gid,
        })
    }

    /// Enters the namespaces, builds `/dev` and makes the jail root this process's `/`.
    /// On failure: which step failed and why.
    pub(super) fn enter(&self) -> Result<(), StepError> {
        let flags =
            libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET;
        // SAFETY: unshare takes no pointers.
        let r = unsafe { libc::unshare(flags) };
        check("unshare the mount, IPC, UTS and network namespaces", r)?;
        mount(
            None,
            c"/",
            None,
            libc::MS_REC | libc::MS_PRIVATE,
            None,
            "make / private",
        )?;
        let root = self.root.as_c_str();
        mount(
            Some(root),
            root,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
            "bind the jail root",
        )?;
        let bind_flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV;
        mount(
            None,
            root,
            None,
            bind_flags,
            None,
            "remount the jail root nosuid,nodev",
        )?;
        let dev = self.dev.as_c_str();
        let dev_flags = libc::MS_NOSUID | libc::MS_NOEXEC;
        mount(
            Some(c"tmpfs"),
            dev,
            Some(c"tmpfs"),
            dev_flags,
            Some(c"mode=755,size=64k"),
            "mount a tmpfs on the jail's /dev",
        )?;
        for node in &self.nodes {
            if let Some(dir) = &node.dir {
                // SAFETY: dir is a NUL-terminated path.
                check("create a directory in /dev", unsafe {
                    libc::mkdir(dir.as_ptr(), 0o755)
                })?;
            }
            // SAFETY: path is a NUL-terminated path; mknod takes no other pointers.
            check("mknod a device in the jail's /dev", unsafe {
                libc::mknod(node.path.as_ptr(), libc::S_IFCHR | 0o600, node.rdev)
            })?;
            // SAFETY: as above.
            check("chown a device in the jail's /dev", unsafe {
                libc::chown(node.path.as_ptr(), self.uid, self.gid)
            })?;
        }
        mount(
            None,
            dev,
            None,
            libc::MS_REMOUNT | libc::MS_RDONLY | dev_flags,
            None,
            "remount /dev read-only",
        )?;
        // SAFETY: root is a NUL-terminated path.
        check("chdir into the jail root", unsafe {
            libc::chdir(root.as_ptr())
        })?;
        // SAFETY: pivot_root takes two NUL-terminated paths.
        let pivoted = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
        if pivoted == 0 {
            // The old root is now stacked on "."; detach it.
            // SAFETY: a NUL-terminated path.
            check("detach the old root", unsafe {
                libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
            })?;
        } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            // The host's root is the initramfs (rootfs), which cannot be pivoted away from.
            mount(
                Some(c"."),
                c"/",
                None,
                libc::MS_MOVE,
                None,
                "move the jail root over /",
            )?;
            // SAFETY: a NUL-terminated path.
            check("chroot into the jail root", unsafe {
                libc::chroot(c".".as_ptr())
            })?;
        } else {
            return Err(StepError::Sys {
                what: "pivot_root into the jail root",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: a NUL-terminated path.
        check("chdir to the new /", unsafe { libc::chdir(c"/".as_ptr()) })?;
        let name = self.hostname.as_bytes();
        // SAFETY: name points to name.len() readable bytes.
        check("set the hostname", unsafe {
            libc::sethostname(name.as_ptr().cast(), name.len())
        })?;
        Ok(())
    }
}

/// A step of entering the jail, in the child, that failed; the child writes it to the
/// parent, which reports it as [`JailError::Child`].
#[derive(Debug, thiserror::Error)]
pub(super) enum StepError {
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("drop capability {cap} from the bounding set: {source}")]
    BoundingSet { cap: i32, source: std::io::Error },
    #[error("capabilities remain after dropping to the unprivileged ids")]
    CapabilitiesRemain,
}

/// Turns a -1 return into the step `what` and its errno.
pub(super) fn check(what: &'static str, r: libc::c_int) -> Result<(), StepError> {
    if r == 0 {
        Ok(())
    } else {
        Err(StepError::Sys {
            what,
            source: std::io::Error::last_os_error(),
        })
    }
}

fn mount(
    src: Option<&std::ffi::CStr>,
    target: &std::ffi::CStr,
    fstype: Option<&std::ffi::CStr>,
    flags: libc::c_ulong,
    data: Option<&std::ffi::CStr>,
    what: &'static str,
) -> Result<(), StepError> {
    let ptr = |s: Option<&std::ffi::CStr>| s.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let r = unsafe {
        libc::mount(
            ptr(src),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    };
    check(what, r)
}
