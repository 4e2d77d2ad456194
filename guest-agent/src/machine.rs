//! What a CI machine has beyond the basic mounts ([`crate::init`]): the /dev links shells
//! use, cgroup v2 controllers delegated and the job in a cgroup of its own, generous
//! rlimits, and an /etc/hosts for images without one.
//!
//! Everything here is best effort and quiet when the kernel lacks the feature (an older or
//! smaller guest kernel): a job that needs none of it still runs.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{symlink, OpenOptionsExt};
use std::path::Path;

use kiln_agent::server::spawn;

/// The root of the unified cgroup hierarchy (mounted by [`crate::init`]).
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup every process the agent starts (jobs, execs, the image's rc script) begins
/// in. A leaf: jobs that make cgroups of their own (Docker, systemd-run, tests that set
/// memory.max) make them beside it under /sys/fs/cgroup, where every controller is enabled.
pub const JOB_CGROUP: &str = "/sys/fs/cgroup/job";

/// Open files per process, soft and hard: what Docker gives containers and what build
/// tools and databases that hold many files open expect (the kernel's fs.nr_open default).
const NOFILE: libc::rlim_t = 1_048_576;

/// Links that devtmpfs does not make but that shells and tools expect: bash's process
/// substitution and `/dev/stdin` arguments use /dev/fd; /dev/ptmx is a node on devtmpfs
/// already, and a link into devpts only where it is missing.
const DEV_LINKS: &[(&str, &str)] = &[
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
    ("pts/ptmx", "/dev/ptmx"),
];

/// What /etc/hosts says when the image has none.
fn hosts_file(hostname: &str) -> String {
    format!(
        "127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
    )
}

/// Runs every step; each reports its own failure.
pub fn setup(hostname: &str) {
    dev_links();
    if let Err(e) = raise_nofile() {
        say!("raising RLIMIT_NOFILE to {NOFILE}: {e}");
    }
    if Path::new(CGROUP_ROOT).join("cgroup.controllers").exists() {
        match cgroups() {
            Ok(procs) => spawn::start_in_cgroup(procs),
            Err(e) => say!("setting up cgroups under {CGROUP_ROOT}: {e}"),
        }
    }
    if let Err(e) = etc_hosts(hostname) {
        say!("writing /etc/hosts: {e}");
    }
}

fn dev_links() {
    for (target, link) in DEV_LINKS {
        // An existing entry (a node, or a link the image made) stays as it is.
        if fs::symlink_metadata(link).is_ok() {
            continue;
        }
        if let Err(e) = symlink(target, link) {
            say!("linking {link} to {target}: {e}");
        }
    }
}

fn raise_nofile() -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: NOFILE,
        rlim_max: NOFILE,
    };
    // SAFETY: setrlimit reads `lim`, which lives across the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Enables every controller the kernel has for the root's children, makes the job cgroup
/// and returns its `cgroup.procs`, open for writing (close-on-exec).
fn cgroups() -> io::Result<OwnedFd> {
    let root = Path::new(CGROUP_ROOT);
    let controllers = fs::read_to_string(root.join("cgroup.controllers"))?;
    // One at a time: a write naming several fails whole if one of them is refused.
    for c in controllers.split_whitespace() {
        if let Err(e) = fs::write(root.join("cgroup.subtree_control"), format!("+{c}")) {
            say!("enabling the {c} cgroup controller: {e}");
        }
    }
    match fs::create_dir(JOB_CGROUP) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let procs = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(Path::new(JOB_CGROUP).join("cgroup.procs"))?;
    Ok(procs.into())
}

/// Writes /etc/hosts only when the image has none, and quietly does nothing on a read-only
/// root: an image's own file (or one shared read-only by many VMs) is never changed.
fn etc_hosts(hostname: &str) -> io::Result<()> {
    let path = Path::new("/etc/hosts");
    if fs::symlink_metadata(path).is_ok() {
        return Ok(());
    }
    let ro = |e: &io::Error| e.raw_os_error() == Some(libc::EROFS);
    if let Err(e) = fs::create_dir_all("/etc") {
        return if ro(&e) { Ok(()) } else { Err(e) };
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path);
    match file {
        Ok(mut f) => f.write_all(hosts_file(hostname).as_bytes()),
        Err(e) if ro(&e) || e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}
