//! Early set-up of PID 1: file systems, standard descriptors, hostname.

use std::ffi::CStr;
use std::io;

/// The guest's hostname.
const HOSTNAME: &str = "kiln";

/// One mount that init makes.
struct Mount {
    source: &'static CStr,
    target: &'static CStr,
    fstype: &'static CStr,
    flags: libc::c_ulong,
    data: &'static CStr,
}

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;

/// In order: /dev first, so that the console is there to report the others.
const MOUNTS: &[Mount] = &[
    Mount {
        source: c"devtmpfs",
        target: c"/dev",
        fstype: c"devtmpfs",
        flags: libc::MS_NOSUID,
        data: c"mode=0755",
    },
    Mount {
        source: c"proc",
        target: c"/proc",
        fstype: c"proc",
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: c"",
    },
    Mount {
        source: c"sysfs",
        target: c"/sys",
        fstype: c"sysfs",
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: c"",
    },
    Mount {
        source: c"tmpfs",
        target: c"/tmp",
        fstype: c"tmpfs",
        flags: NOSUID_NODEV,
        data: c"mode=1777",
    },
    Mount {
        source: c"tmpfs",
        target: c"/run",
        fstype: c"tmpfs",
        flags: NOSUID_NODEV,
        data: c"mode=0755",
    },
];

/// Mounts the file systems, gives init a console on fds 0–2 and sets the hostname.
/// Failures are reported and skipped.
pub fn setup() {
    for (i, m) in MOUNTS.iter().enumerate() {
        if let Err(e) = mount(m) {
            say!("mounting {}: {e}", m.target.to_string_lossy());
        }
        if i == 0 {
            if let Err(e) = console_stdio() {
                say!("opening /dev/console for stdio: {e}");
            }
        }
    }
    if let Err(e) = set_hostname(HOSTNAME) {
        say!("setting the hostname: {e}");
    }
}

fn mount(m: &Mount) -> io::Result<()> {
    // SAFETY: `target` is a NUL-terminated string that outlives the call.
    if unsafe { libc::mkdir(m.target.as_ptr(), 0o755) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            m.source.as_ptr(),
            m.target.as_ptr(),
            m.fstype.as_ptr(),
            m.flags,
            m.data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    // The kernel may have mounted devtmpfs itself (CONFIG_DEVTMPFS_MOUNT).
    if e.raw_os_error() == Some(libc::EBUSY) {
        return Ok(());
    }
    Err(e)
}

/// Points every closed descriptor among 0, 1 and 2 at `/dev/console`. The kernel opens the
/// console for init only when the initramfs itself has a `/dev/console` node.
pub fn console_stdio() -> io::Result<()> {
    // SAFETY: F_GETFD only queries the descriptor table.
    let closed: Vec<libc::c_int> = (0..3)
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1)
        .collect();
    if closed.is_empty() {
        return Ok(());
    }
    // SAFETY: the path is a NUL-terminated string; the returned descriptor is owned here.
    let fd = unsafe { libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    for &target in &closed {
        // SAFETY: `fd` is open and `target` is one of the closed standard descriptors.
        if target != fd && unsafe { libc::dup2(fd, target) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if fd > 2 {
        // SAFETY: `fd` was opened above and is not one of the standard descriptors.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, which outlive the call.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
