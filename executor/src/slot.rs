//! Concurrency slots: the `{id}` of the `net` setting (which TAP a job's VM attaches to).
//!
//! GitLab Runner's `CI_CONCURRENT_ID` reaches the driver only as a job variable, which a
//! job can set to any value, e.g. another running job's slot, so the driver numbers its
//! jobs itself. Slot `n` is held by an exclusive `flock(2)` on `<state_dir>/slots/<n>.lock`;
//! `prepare` takes the lowest free one and hands the locked file to the VM's `kiln` process,
//! which keeps it for as long as it runs. The kernel drops the lock when the last process
//! holding it ends, so a slot is free again once its VM has stopped (at `cleanup`, or when
//! the VM died or was killed) and nothing ever has to recover it by hand.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// A claimed slot; its lock lasts while this file, or an inherited copy of it, is open.
#[derive(Debug)]
pub struct Slot {
    pub index: u32,
    lock: File,
}

impl Slot {
    /// Claims the lowest free slot below `count`.
    pub fn claim(state_dir: &Path, count: u32) -> Result<Slot> {
        let dir = state_dir.join("slots");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create the slot directory {}", dir.display()))?;
        for index in 0..count {
            let path = dir.join(format!("{index}.lock"));
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("cannot open the slot lock {}", path.display()))?;
            // SAFETY: flock on an fd we own; no pointers.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Slot { index, lock });
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        bail!(
            "all {count} slots are taken by running jobs' VMs (the driver's `slots` setting; \
             GitLab Runner's `concurrent` should not be larger)"
        )
    }

    /// The lock's fd, for the VM's process to inherit (see [`keep_across_exec`]).
    pub fn fd(&self) -> RawFd {
        self.lock.as_raw_fd()
    }
}

/// Clears close-on-exec on `fd`, in a `pre_exec` hook: the exec'd process then holds the
/// slot's lock too. Only async-signal-safe calls.
pub fn keep_across_exec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd that is open in this process; no pointers.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_slot_and_release() {
        let dir = std::env::temp_dir().join(format!("kiln-gitlab-slots-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = Slot::claim(&dir, 3).unwrap();
        let b = Slot::claim(&dir, 3).unwrap();
        let c = Slot::claim(&dir, 3).unwrap();
        assert_eq!((a.index, b.index, c.index), (0, 1, 2));
        let err = Slot::claim(&dir, 3).unwrap_err();
        assert!(err.to_string().contains("all 3 slots are taken"), "{err}");
        // A slot whose holder is gone is free again, and is the lowest.
        drop(b);
        assert_eq!(Slot::claim(&dir, 3).unwrap().index, 1);
        drop((a, c));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_exec_d_child_keeps_the_slot() {
        use std::os::unix::process::CommandExt;
        let dir = std::env::temp_dir().join(format!("kiln-gitlab-slotx-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let slot = Slot::claim(&dir, 2).unwrap();
        let fd = slot.fd();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        // SAFETY: the hook only calls fcntl.
        unsafe { cmd.pre_exec(move || keep_across_exec(fd)) };
        let mut child = cmd.spawn().unwrap();
        drop(slot);
        // The child holds slot 0: the next claim gets 1.
        assert_eq!(Slot::claim(&dir, 2).unwrap().index, 1);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(Slot::claim(&dir, 2).unwrap().index, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
