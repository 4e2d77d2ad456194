//! Snapshots of a job's VM into the snapshot store, through the VM's control API.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::state::{api_call, JobDir};

/// How long a snapshot may take (the VM is paused meanwhile).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Snapshots the running VM of `job` as `<scope>/<name>`, replacing a snapshot of that
/// name only once the new one is complete (clones running from the old one keep their
/// mapping: its files are unlinked, not changed). The VM resumes afterwards. `tag` makes
/// the temporary names unique per job.
pub fn take(job: &JobDir, scope: &Path, name: &str, tag: &str) -> Result<(PathBuf, Duration)> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(scope)
        .with_context(|| format!("cannot create the snapshot store {}", scope.display()))?;
    let tmp = scope.join(format!(".tmp-{name}-{tag}"));
    let _ = std::fs::remove_dir_all(&tmp);
    let start = Instant::now();
    let request =
        serde_json::json!({"cmd": "snapshot", "dir": tmp, "resume": true, "kind": "full"});
    if let Err(e) = api_call(&job.api(), &request, SNAPSHOT_TIMEOUT) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("snapshot {name:?} failed")));
    }
    let took = start.elapsed();
    let dest = scope.join(name);
    let old = scope.join(format!(".old-{name}-{tag}"));
    let had_old = std::fs::rename(&dest, &old).is_ok();
    std::fs::rename(&tmp, &dest)
        .with_context(|| format!("cannot move the snapshot to {}", dest.display()))?;
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok((dest, took))
}
