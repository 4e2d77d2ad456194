//! Where kiln finds its guest kernel and default agent initramfs when no flag names them:
//! `$KILN_HOME`, else `/usr/lib/kiln` (where the package installs them), else the build
//! cache `kernel-config/build.sh` fills (`${KILN_CACHE_DIR:-~/.cache/kiln}/kernels/guest-*`,
//! the newest).

use std::path::{Path, PathBuf};

/// The guest kernel's file name in a kiln home.
pub const KERNEL_FILE: &str = "vmlinux";
/// The default agent initramfs's file name in a kiln home (busybox and `kiln-agent`).
pub const INITRAMFS_FILE: &str = "initramfs.cpio";
/// Where the Debian package installs them.
pub const SYSTEM_HOME: &str = "/usr/lib/kiln";

/// A default that is not there, and the places kiln looked for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no {what} given and none found; looked at {}; {hint}", .looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
pub struct NotFound {
    pub what: &'static str,
    pub looked: Vec<PathBuf>,
    pub hint: &'static str,
}

/// The directories searched, in order.
pub fn homes() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(home) = std::env::var_os("KILN_HOME").filter(|h| !h.is_empty()) {
        dirs.push(PathBuf::from(home));
    }
    dirs.push(PathBuf::from(SYSTEM_HOME));
    if let Some(cached) = newest_cached_guest(&cache_dir().join("kernels")) {
        dirs.push(cached);
    }
    dirs
}

fn cache_dir() -> PathBuf {
    match std::env::var_os("KILN_CACHE_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root"))
            .join(".cache/kiln"),
    }
}

/// The most recently built `guest-*` kernel directory under `kernels`.
fn newest_cached_guest(kernels: &Path) -> Option<PathBuf> {
    std::fs::read_dir(kernels)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("guest-"))
        .filter(|e| e.path().join(".complete").is_file())
        .filter_map(|e| {
            let modified = e
                .path()
                .join(KERNEL_FILE)
                .metadata()
                .ok()?
                .modified()
                .ok()?;
            Some((modified, e.path()))
        })
        .max()
        .map(|(_, path)| path)
}

fn find(file: &str, what: &'static str, hint: &'static str) -> Result<PathBuf, NotFound> {
    let looked: Vec<PathBuf> = homes().into_iter().map(|d| d.join(file)).collect();
    looked
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or(NotFound { what, looked, hint })
}

/// The default guest kernel.
pub fn guest_kernel() -> Result<PathBuf, NotFound> {
    find(
        KERNEL_FILE,
        "guest kernel",
        "install the kiln package, set $KILN_HOME, run kernel-config/build.sh guest, or give --kernel",
    )
}

/// The default agent initramfs.
pub fn agent_initramfs() -> Result<PathBuf, NotFound> {
    find(
        INITRAMFS_FILE,
        "agent initramfs",
        "install the kiln package, set $KILN_HOME, or give --initrd or --image",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_complete_guest_build_is_taken() {
        let root = crate::test_util::scratch("defaults");
        for (name, complete) in [("guest-a", true), ("guest-b", true), ("guest-c", false)] {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(KERNEL_FILE), name).unwrap();
            if complete {
                std::fs::write(dir.join(".complete"), "").unwrap();
            }
            // Modification times a second apart, in creation order.
            let t = std::time::SystemTime::UNIX_EPOCH
                + std::time::Duration::from_secs(
                    1_000_000 + name.len() as u64 * 10 + u64::from(name.as_bytes()[6]),
                );
            std::fs::File::options()
                .write(true)
                .open(dir.join(KERNEL_FILE))
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        std::fs::create_dir_all(root.join("testbed-host-x")).unwrap();
        assert_eq!(newest_cached_guest(&root), Some(root.join("guest-b")));
        assert_eq!(newest_cached_guest(&root.join("none")), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_missing_default_says_where_kiln_looked_and_what_to_do() {
        let e = NotFound {
            what: "guest kernel",
            looked: vec![PathBuf::from("/a/vmlinux"), PathBuf::from("/b/vmlinux")],
            hint: "give --kernel",
        };
        assert_eq!(
            e.to_string(),
            "no guest kernel given and none found; looked at /a/vmlinux, /b/vmlinux; give --kernel"
        );
    }
}
