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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// A fake VM API that serves `n` connections: a snapshot request writes `state` holding
    /// `tag` into the requested dir (or fails when `tag` is "fail").
    fn fake_api(path: PathBuf, n: usize, tag: &'static str) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(n) {
                let mut stream = stream.unwrap();
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                let req: serde_json::Value = serde_json::from_str(&line).unwrap();
                assert_eq!(req["cmd"], "snapshot");
                assert_eq!(req["resume"], true);
                let response = if tag == "fail" {
                    serde_json::json!({"ok": false, "error": "disk full"})
                } else {
                    let dir = PathBuf::from(req["dir"].as_str().unwrap());
                    std::fs::create_dir_all(&dir).unwrap();
                    std::fs::write(dir.join("state"), tag).unwrap();
                    serde_json::json!({"ok": true})
                };
                writeln!(stream, "{response}").unwrap();
            }
        })
    }

    #[test]
    fn snapshots_replace_older_ones_whole_and_failures_leave_nothing() {
        let root = std::env::temp_dir().join(format!("kiln-gitlab-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let job = JobDir {
            dir: root.join("job"),
        };
        job.create().unwrap();
        let scope = root.join("snaps/project-1");
        for tag in ["first", "second"] {
            let server = fake_api(job.api(), 1, tag);
            let (dir, _) = take(&job, &scope, "warm", "1-2").unwrap();
            server.join().unwrap();
            std::fs::remove_file(job.api()).unwrap();
            assert_eq!(dir, scope.join("warm"));
            assert_eq!(std::fs::read_to_string(dir.join("state")).unwrap(), tag);
        }
        let server = fake_api(job.api(), 1, "fail");
        let err = take(&job, &scope, "warm", "1-2").unwrap_err();
        server.join().unwrap();
        assert!(format!("{err:#}").contains("disk full"), "{err:#}");
        // The old snapshot is intact and no temporary directory is left.
        let names: Vec<_> = std::fs::read_dir(&scope)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["warm"]);
        assert_eq!(
            std::fs::read_to_string(scope.join("warm/state")).unwrap(),
            "second"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
