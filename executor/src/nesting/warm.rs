//! Warm snapshots: where a slot's snapshot of an image lives and when it is still valid.
//!
//! The first Create of an image in a slot boots the VM and, once its guest agent answers
//! (before the login, host key and sshd are set up), snapshots it; later Creates of that
//! image in that slot restore a clone of it instead of booting. A snapshot is per slot
//! because the guest keeps the address it booted with (the slot's); the clone gets a new
//! MAC, the host's clock and fresh entropy from `kiln restore`, and its own login and
//! host key from the same set-up a booted VM gets.
//!
//! A snapshot's directory name is a fingerprint of everything it depends on: the image's
//! root disk, the kernel, the `kiln` binary, memory, vCPUs and the slot's address. An
//! image rebuilt or replaced gets a new fingerprint; the stale snapshots of that slot are
//! removed when the new one is made.

use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A file's identity for the fingerprint: size, modification time and inode (a rebuilt or
/// re-imported image is a new file).
fn file_id(path: &Path, h: &mut impl Hasher) {
    match std::fs::metadata(path) {
        Ok(m) => (m.len(), m.mtime(), m.mtime_nsec(), m.ino(), m.dev()).hash(h),
        Err(_) => "missing".hash(h),
    }
}

/// What a snapshot of one image in one slot depends on.
#[derive(Debug, Clone)]
pub struct WarmKey<'a> {
    pub root: &'a Path,
    pub image: &'a str,
    pub slot: u32,
    pub image_disk: &'a Path,
    pub kernel: &'a Path,
    pub kiln: &'a Path,
    pub memory_mib: u64,
    pub vcpus: u64,
    pub guest_addr: std::net::Ipv4Addr,
}

impl WarmKey<'_> {
    /// `<root>/<image>/slot-<N>`: every snapshot of the image in the slot, valid or not.
    fn slot_dir(&self) -> PathBuf {
        self.root
            .join(self.image)
            .join(format!("slot-{}", self.slot))
    }

    fn fingerprint(&self) -> String {
        // SipHash with fixed keys: the same inputs give the same name in every run of
        // this binary; a new binary changes the kiln file anyway.
        let mut h = std::hash::DefaultHasher::new();
        file_id(self.image_disk, &mut h);
        file_id(self.kernel, &mut h);
        file_id(self.kiln, &mut h);
        (self.memory_mib, self.vcpus, u32::from(self.guest_addr)).hash(&mut h);
        format!("{:016x}", h.finish())
    }

    /// The snapshot's directory (it may not exist yet).
    pub fn dir(&self) -> PathBuf {
        self.slot_dir().join(self.fingerprint())
    }

    /// A valid snapshot to restore, if one has been made.
    pub fn ready(&self) -> Option<PathBuf> {
        let dir = self.dir();
        dir.join(READY).is_file().then_some(dir)
    }

    /// A fresh directory to write a snapshot into, beside where it will go.
    pub fn staging(&self, vm_id: &str) -> std::io::Result<PathBuf> {
        let slot_dir = self.slot_dir();
        std::fs::create_dir_all(&slot_dir)?;
        let tmp = slot_dir.join(format!(".{vm_id}.tmp"));
        remove(&tmp)?;
        Ok(tmp)
    }

    /// Puts a written snapshot in place and removes the slot's stale ones.
    pub fn publish(&self, staged: &Path) -> std::io::Result<PathBuf> {
        let dir = self.dir();
        remove(&dir)?;
        std::fs::write(staged.join(READY), b"")?;
        std::fs::rename(staged, &dir)?;
        for entry in std::fs::read_dir(self.slot_dir())? {
            let path = entry?.path();
            if path != dir && !is_staging(&path) {
                remove(&path)?;
            }
        }
        Ok(dir)
    }

    /// Drops the snapshot (one whose clone did not come up): the next Create boots.
    pub fn discard(&self) -> std::io::Result<()> {
        remove(&self.dir())
    }
}

/// Written last into a snapshot's directory: a directory without it is half made.
const READY: &str = "ready";

fn is_staging(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_image_invalidates_the_snapshot_and_publishing_removes_stale_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = tmp.path().join("rootfs.ext4");
        let kernel = tmp.path().join("vmlinux");
        std::fs::write(&disk, b"image one").unwrap();
        std::fs::write(&kernel, b"kernel").unwrap();
        let root = tmp.path().join("warm");
        let key = WarmKey {
            root: &root,
            image: "debian-ci",
            slot: 1,
            image_disk: &disk,
            kernel: &kernel,
            kiln: &kernel,
            memory_mib: 256,
            vcpus: 1,
            guest_addr: "10.213.1.2".parse().unwrap(),
        };
        assert_eq!(key.ready(), None);
        let staged = key.staging("vm-a").unwrap();
        std::fs::create_dir_all(&staged).unwrap();
        std::fs::write(staged.join("memory"), b"m").unwrap();
        let first = key.publish(&staged).unwrap();
        assert_eq!(key.ready(), Some(first.clone()));
        // Another memory size is another snapshot.
        let bigger = WarmKey {
            memory_mib: 512,
            ..key.clone()
        };
        assert_eq!(bigger.ready(), None);
        // The image replaced (a new file): the old snapshot no longer counts...
        std::fs::remove_file(&disk).unwrap();
        std::fs::write(&disk, b"image two, rebuilt").unwrap();
        assert_eq!(key.ready(), None);
        // ...and making the new one removes it.
        let staged = key.staging("vm-b").unwrap();
        std::fs::create_dir_all(&staged).unwrap();
        let second = key.publish(&staged).unwrap();
        assert_ne!(first, second);
        assert!(!first.exists());
        assert_eq!(key.ready(), Some(second));
        key.discard().unwrap();
        assert_eq!(key.ready(), None);
    }
}
