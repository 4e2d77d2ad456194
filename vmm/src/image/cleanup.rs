//! Removing what a build leaves: its staging tree, which may have file systems mounted in
//! it (a debootstrap stopped half-way), and leftovers of builds whose process is gone.

use std::path::{Path, PathBuf};

use super::ImageError;

/// Whether process `pid` exists.
pub(crate) fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes a directory tree, first unmounting whatever is mounted below it: a debootstrap
/// that failed half-way can leave the target's /proc or /sys mounted, and deleting through
/// those would reach the host's.
pub(crate) fn remove_tree(dir: &Path) -> Result<(), ImageError> {
    for mount in mounts_below(dir) {
        let Ok(c) = std::ffi::CString::new(mount.into_os_string().into_encoded_bytes()) else {
            continue;
        };
        // SAFETY: umount2 only reads the NUL-terminated path, alive across the call.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    if !mounts_below(dir).is_empty() {
        return Err(ImageError::Io {
            what: "cannot unmount what is mounted below",
            path: dir.to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::ResourceBusy),
        });
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(ImageError::io("cannot remove", dir)(e))
        }
        _ => Ok(()),
    }
}

/// Mount points at or below `dir`, deepest first (from /proc/self/mounts).
pub(crate) fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut below: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        // /proc/self/mounts writes a space in a path as \040.
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(&dir))
        .collect();
    below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    below
}
