//! Early set-up of PID 1: file systems, standard descriptors, hostname. What a CI machine
//! has beyond that (cgroups, rlimits, /etc/hosts) is [`crate::machine`]'s.

use std::ffi::CStr;
use std::io;

/// The guest's hostname.
pub const HOSTNAME: &str = "kiln";

/// One mount that init makes.
struct Mount {
    source: &'static CStr,
    target: &'static CStr,
    fstype: &'static CStr,
    flags: libc::c_ulong,
    data: &'static CStr,
    /// Skipped without a word when the kernel lacks the file system or the mount point
    /// (an older or smaller guest kernel): what a CI machine has, not what the agent needs.
    optional: bool,
}

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;
const NOSUID_NODEV_NOEXEC: libc::c_ulong = NOSUID_NODEV | libc::MS_NOEXEC;

/// In order: /dev first, so that the console is there to report the others.
const MOUNTS: &[Mount] = &[
    Mount {
        source: c"devtmpfs",
        target: c"/dev",
        fstype: c"devtmpfs",
        flags: libc::MS_NOSUID,
        data: c"mode=0755",
        optional: false,
    },
    Mount {
        source: c"proc",
        target: c"/proc",
        fstype: c"proc",
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: c"",
        optional: false,
    },
    Mount {
        source: c"sysfs",
        target: c"/sys",
        fstype: c"sysfs",
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: c"",
        optional: false,
    },
    Mount {
        source: c"tmpfs",
        target: c"/tmp",
        fstype: c"tmpfs",
        flags: NOSUID_NODEV,
        data: c"mode=1777",
        optional: false,
    },
    Mount {
        source: c"tmpfs",
        target: c"/run",
        fstype: c"tmpfs",
        flags: NOSUID_NODEV,
        data: c"mode=0755",
        optional: false,
    },
    // Terminals: a private devpts instance; /dev/ptmx (the devtmpfs node, or the link
    // `machine` makes) opens the /dev/pts beside it. gid 5 is Debian's `tty` group.
    Mount {
        source: c"devpts",
        target: c"/dev/pts",
        fstype: c"devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: c"newinstance,ptmxmode=0666,mode=0620,gid=5",
        optional: true,
    },
    // POSIX shared memory and semaphores (shm_open, sem_open: PostgreSQL, Python
    // multiprocessing).
    Mount {
        source: c"shm",
        target: c"/dev/shm",
        fstype: c"tmpfs",
        flags: NOSUID_NODEV,
        data: c"mode=1777",
        optional: true,
    },
    // POSIX message queues, where `ls` and tools expect them.
    Mount {
        source: c"mqueue",
        target: c"/dev/mqueue",
        fstype: c"mqueue",
        flags: NOSUID_NODEV_NOEXEC,
        data: c"",
        optional: true,
    },
    // The unified cgroup hierarchy; `machine` delegates its controllers.
    Mount {
        source: c"cgroup2",
        target: c"/sys/fs/cgroup",
        fstype: c"cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: c"nsdelegate",
        optional: true,
    },
    // Where update-binfmts and `docker run --privileged tonistiigi/binfmt` register
    // foreign-architecture interpreters.
    Mount {
        source: c"binfmt_misc",
        target: c"/proc/sys/fs/binfmt_misc",
        fstype: c"binfmt_misc",
        flags: NOSUID_NODEV_NOEXEC,
        data: c"",
        optional: true,
    },
];

/// Mounts the file systems, gives init a console on fds 0–2 and sets the hostname.
/// Failures are reported and skipped.
pub fn setup() {
    for (i, m) in MOUNTS.iter().enumerate() {
        match mount(m) {
            Ok(()) => {}
            Err(e) if m.optional && is_absent(&e) => {}
            Err(e) => say!("mounting {}: {e}", m.target.to_string_lossy()),
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

/// The kernel has no such file system (ENODEV) or no such mount point, which sysfs and
/// proc refuse to create (ENOENT, EPERM: /sys/fs/cgroup without cgroups), or the root is
/// read-only (EROFS).
fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENODEV | libc::ENOENT | libc::EPERM | libc::EROFS)
    )
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
