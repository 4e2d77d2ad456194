//! Host TAP devices: attach to an existing one for a VM, or create and delete a persistent
//! one (`kiln net setup/teardown`).
//!
//! A VM attaches only to a TAP that already exists: TUNSETIFF on an unknown name would
//! silently create a new, unconfigured device that vanishes with the VM, which is never what
//! a `--net tap=NAME` meant.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::VNET_HDR_LEN;

const TUN_PATH: &str = "/dev/net/tun";

/// Why a TAP could not be opened, created or deleted.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("TAP name {0:?} is not an interface name (1 to 15 bytes, no '/', ':', spaces or NUL)")]
    BadName(String),
    /// No interface has that name.
    #[error("TAP device {0:?} does not exist; create it first, e.g. `kiln net setup --tap {0} --host-ip 10.0.0.1/24`")]
    Missing(String),
    /// The interface exists but is not a TAP kiln can attach to.
    #[error("network interface {0:?} is not a TAP device (a single-queue TAP, as `kiln net setup` makes)")]
    NotTap(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open {TUN_PATH}: {0} (is the tun module loaded?)")]
    OpenTun(#[source] io::Error),
    /// The kernel refused an ioctl on the TAP.
    #[error("TAP device {name:?}: {what}: {source}{hint}")]
    Ioctl {
        /// The TAP.
        name: String,
        /// What was being done.
        what: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
        /// How to fix a permission error, else empty.
        hint: &'static str,
    },
}

/// An open TAP queue, nonblocking, carrying frames with a [`VNET_HDR_LEN`]-byte vnet header.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attach to the existing TAP `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        check_name(name)?;
        if !interface_exists(name) {
            return Err(TapError::Missing(name.to_string()));
        }
        let file = match open_tun(name, libc::IFF_VNET_HDR) {
            // The kernel's answer for an existing interface that is not a TAP (or a TUN, or
            // a multiqueue TAP).
            Err(TapError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                return Err(TapError::NotTap(name.to_string()))
            }
            other => other?,
        };
        let err = |what, source| ioctl_error(name, what, source);
        let hdr_len = libc::c_int::try_from(VNET_HDR_LEN).unwrap_or(12);
        // SAFETY: TUNSETVNETHDRSZ reads one c_int from the pointer, which outlives the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(err("TUNSETVNETHDRSZ", io::Error::last_os_error()));
        }
        // No offloads: the guest negotiates none, so the host must hand over only finished,
        // checksummed, MTU-sized frames. (A new TAP starts with checksum and TSO offload on.)
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(err("TUNSETOFFLOAD", io::Error::last_os_error()));
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// Attach to the TAP `name` through `file`, which another process (the jailer, in the
    /// host's network namespace, which this process may not see) attached with [`Tap::open`]
    /// and handed over. TUNGETIFF checks that it is that TAP, with the vnet header.
    pub fn from_attached(file: File, name: &str) -> Result<Self, TapError> {
        check_name(name)?;
        // SAFETY: an all-zero ifreq is a valid value of this plain C struct.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes one ifreq through the pointer, which outlives the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut req) } < 0 {
            return Err(ioctl_error(name, "TUNGETIFF", io::Error::last_os_error()));
        }
        // The kernel NUL-terminates ifr_name; c_char is i8 or u8 depending on the target.
        let attached: Vec<u8> = req
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c.to_ne_bytes()[0])
            .collect();
        // SAFETY: TUNGETIFF filled the flags member of the union.
        let flags = libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags });
        let wanted = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if attached != name.as_bytes() || flags & wanted != wanted {
            return Err(TapError::NotTap(name.to_string()));
        }
        let fd = file.as_raw_fd();
        // SAFETY: fcntl with integer arguments on an fd we own.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            let source = io::Error::last_os_error();
            return Err(ioctl_error(name, "F_SETFL O_NONBLOCK", source));
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// The attached file, to hand to another process (see [`Tap::from_attached`]).
    pub fn into_file(self) -> File {
        self.file
    }

    /// A TAP stand-in over any nonblocking, frame-preserving file (a SOCK_SEQPACKET socket),
    /// for tests and fuzzing.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn from_file(file: File, name: &str) -> Self {
        Tap {
            file,
            name: name.to_string(),
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Read one frame (vnet header first) into `buf`; `WouldBlock` when there is none.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    /// Write one frame (vnet header first).
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Create the persistent TAP `name` (it outlives this process, until [`delete_persistent`]).
/// With `owner`, only that user (or a process with CAP_NET_ADMIN) may attach to it; without,
/// anyone who can open /dev/net/tun may. Fails if an interface of that name exists already.
pub fn create_persistent(name: &str, owner: Option<u32>) -> Result<(), TapError> {
    check_name(name)?;
    if interface_exists(name) {
        return Err(ioctl_error(
            name,
            "create",
            io::Error::from_raw_os_error(libc::EEXIST),
        ));
    }
    let file = open_tun(name, 0)?;
    if let Some(uid) = owner {
        // SAFETY: TUNSETOWNER takes its argument by value.
        if unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETOWNER,
                libc::c_ulong::from(uid),
            )
        } < 0
        {
            return Err(ioctl_error(name, "TUNSETOWNER", io::Error::last_os_error()));
        }
    }
    set_persist(&file, name, true)
}

/// Delete the persistent TAP `name` (no VM may be attached to it).
pub fn delete_persistent(name: &str) -> Result<(), TapError> {
    check_name(name)?;
    if !interface_exists(name) {
        return Err(TapError::Missing(name.to_string()));
    }
    set_persist(&open_tun(name, 0)?, name, false)
}

fn set_persist(file: &File, name: &str, on: bool) -> Result<(), TapError> {
    // SAFETY: TUNSETPERSIST takes its argument by value.
    if unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETPERSIST,
            libc::c_ulong::from(on),
        )
    } < 0
    {
        return Err(ioctl_error(
            name,
            "TUNSETPERSIST",
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Open `/dev/net/tun` and attach it to the TAP `name` with `IFF_TAP | IFF_NO_PI | extra`.
fn open_tun(name: &str, extra: libc::c_int) -> Result<File, TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(TapError::OpenTun)?;
    let mut req = ifreq(name)?;
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | extra;
    req.ifr_ifru.ifru_flags = libc::c_short::try_from(flags).unwrap_or(0);
    // SAFETY: TUNSETIFF reads and writes one ifreq through the pointer, which outlives it.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(ioctl_error(name, "TUNSETIFF", io::Error::last_os_error()));
    }
    Ok(file)
}

fn ifreq(name: &str) -> Result<libc::ifreq, TapError> {
    kiln_agent::netif::ifreq(name).map_err(|_| TapError::BadName(name.to_string()))
}

fn check_name(name: &str) -> Result<(), TapError> {
    if kiln_agent::netif::valid_name(name) {
        Ok(())
    } else {
        Err(TapError::BadName(name.to_string()))
    }
}

/// Whether this thread's network namespace has an interface `name` (asked of the kernel,
/// not of /sys, which shows the namespace it was mounted in).
fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

fn ioctl_error(name: &str, what: &'static str, source: io::Error) -> TapError {
    let hint = match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (needs CAP_NET_ADMIN, or a TAP whose owner is this user: run as root or \
             have root create it with `kiln net setup`)"
        }
        Some(libc::EBUSY) => " (another process, maybe another VM, is attached to it)",
        _ => "",
    };
    TapError::Ioctl {
        name: name.to_string(),
        what,
        source,
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_and_missing_names_are_clear_errors() {
        for bad in ["", "a/b", "0123456789abcdef", "a b", ".."] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::BadName(_))),
                "{bad:?}"
            );
        }
        let e = Tap::open("kilnnosuchtap0").unwrap_err();
        assert!(matches!(e, TapError::Missing(_)), "{e}");
        assert!(e.to_string().contains("kiln net setup"), "{e}");
        // The loopback interface exists on every host and is not a TAP.
        assert!(matches!(Tap::open("lo"), Err(TapError::NotTap(_))));
    }
}
