//! Unique temporary directories, removed on drop, so that tests can run side by side.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

/// A fresh directory under the system's temp dir, deleted with its contents on drop
/// unless [`TempDir::keep`] is called.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates `<tmp>/kiln-<label>-<pid>-<n>-<nanos>`.
    pub fn new(label: &str) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "kiln-{label}-{}-{n}-{nanos:09}",
            std::process::id()
        ));
        // create_dir (not create_dir_all) fails if the name is somehow taken.
        std::fs::create_dir(&path)
            .with_context(|| format!("creating temp dir {}", path.display()))?;
        Ok(TempDir { path, keep: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the directory in place (for debugging a failed run).
    pub fn keep(mut self) -> PathBuf {
        self.keep = true;
        self.path.clone()
    }
}

/// A copy of the program `bin` in a fresh temp directory that every user may enter, for a
/// test that runs it as another user (nobody): the checkout it was built in may be out of
/// that user's reach, as a clone in a `mktemp -d` directory (mode 0700) is. The copy goes
/// when the returned directory is dropped.
pub fn copy_for_all_users(bin: &Path) -> Result<(TempDir, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("bin")?;
    let all = |path: &Path| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} reachable by every user", path.display()))
    };
    all(dir.path())?;
    let name = bin
        .file_name()
        .with_context(|| format!("{} names no file", bin.display()))?;
    let copy = dir.path().join(name);
    std::fs::copy(bin, &copy)
        .with_context(|| format!("copying {} to {}", bin.display(), copy.display()))?;
    all(&copy)?;
    Ok((dir, copy))
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
