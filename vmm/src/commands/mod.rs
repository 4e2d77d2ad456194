//! One module per `kiln` subcommand; `main.rs` only dispatches.

pub mod cp;
pub mod ctl;
pub mod doctor;
pub mod exec;
pub mod fork;
pub mod image;
pub mod jail;
pub mod job;
pub mod net;
pub mod ps;
pub mod restore;
pub mod run;

use std::path::{Path, PathBuf};

use anyhow::Context;

/// A private directory for a VM's sockets and temporary overlays, removed when dropped.
pub(crate) struct RuntimeDir(PathBuf);

impl RuntimeDir {
    pub(crate) fn create(what: &str) -> anyhow::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = base.join(format!("kiln-{what}-{}-{nanos:x}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create runtime directory {}", dir.display()))?;
        Ok(RuntimeDir(dir))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!("cannot remove {}: {e}", self.0.display());
        }
    }
}
