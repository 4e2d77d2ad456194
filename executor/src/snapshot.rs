//! Snapshots of a job's VM into the snapshot store, through the VM's control API.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::launch::SNAPSHOT_IMAGE_FILE;
use crate::state::{api_call, JobDir};

/// How long a snapshot may take (the VM is paused meanwhile).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Snapshots the running VM of `job` as `<scope>/<name>`, replacing a snapshot of that
/// name only once the new one is complete (clones running from the old one keep their
/// mapping: its files are unlinked, not changed). The VM resumes afterwards. `tag` makes
/// the temporary names unique per job.
///
/// A jailed VM can write only inside its jail: it writes the snapshot into its root, and the
/// driver moves it into the store and makes its files the driver's own, readable only by the
/// jails' group `jail_gid` (`0640`), so that no later jail can change a snapshot that other
/// jobs start from (a jail links such files in instead of copying them) and no other user of
/// the host can read the guest memory they hold.
pub fn take(
    job: &JobDir,
    scope: &Path,
    name: &str,
    tag: &str,
    jail_gid: u32,
) -> Result<(PathBuf, Duration)> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(scope)
        .with_context(|| format!("cannot create the snapshot store {}", scope.display()))?;
    let tmp = scope.join(format!(".tmp-{name}-{tag}"));
    let _ = std::fs::remove_dir_all(&tmp);
    let jail_root = job.jail_root();
    // Where the VM writes it: its own path for it, and that place on the host.
    let (asked, written) = match &jail_root {
        Some(root) => {
            let inside = format!("snapshot-{tag}");
            let _ = std::fs::remove_dir_all(root.join(&inside));
            (PathBuf::from("/").join(&inside), root.join(&inside))
        }
        None => (tmp.clone(), tmp.clone()),
    };
    let start = Instant::now();
    let request =
        serde_json::json!({"cmd": "snapshot", "dir": asked, "resume": true, "kind": "full"});
    if let Err(e) = api_call(&job.api(), &request, SNAPSHOT_TIMEOUT) {
        let _ = std::fs::remove_dir_all(&written);
        return Err(e.context(format!("snapshot {name:?} failed")));
    }
    let took = start.elapsed();
    if jail_root.is_some() {
        let moved = move_dir(&written, &tmp)
            .and_then(|()| {
                if let Some(image) = job.store_image() {
                    std::fs::write(tmp.join(SNAPSHOT_IMAGE_FILE), format!("{image}\n"))?;
                }
                seal(&tmp, jail_gid)
            })
            .with_context(|| format!("cannot move the snapshot into {}", scope.display()));
        if let Err(e) = moved {
            let _ = std::fs::remove_dir_all(&written);
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    }
    // A restored job runs with the defaults of the image its VM was booted from.
    let kept = job.dir.join(crate::defaults::FILE);
    if kept.is_file() {
        if let Err(e) = std::fs::copy(&kept, tmp.join(crate::defaults::FILE)) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e).context("cannot keep the image's defaults with the snapshot");
        }
    }
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

/// Moves a directory of plain files: a rename, or a copy across filesystems.
fn move_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {}
        other => return other,
    }
    std::fs::create_dir(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            move_dir(&entry.path(), &to.join(entry.file_name()))?;
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    std::fs::remove_dir_all(from)
}

/// Makes everything in `dir` the driver's: files 0644, directories 0700.
fn seal(dir: &Path, group: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !std::fs::symlink_metadata(dir)?.is_dir() {
        return Err(std::io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            seal(&entry.path(), group)?;
        } else {
            // The VMM writes new plain files. Anything else (a symlink, or a hard link to a
            // file the jail was given, whose owner and mode must not change) is refused.
            let meta = entry.metadata()?;
            if !kind.is_file() || meta.nlink() != 1 {
                return Err(std::io::Error::other(format!(
                    "{} is not a plain file that the VM wrote",
                    entry.path().display()
                )));
            }
            std::os::unix::fs::lchown(entry.path(), Some(uid), Some(group))?;
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o640))?;
        }
    }
    Ok(())
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
        job.create(&crate::state::tests::identity(1, "t")).unwrap();
        let scope = root.join("snaps/project-1");
        for tag in ["first", "second"] {
            let server = fake_api(job.api(), 1, tag);
            let (dir, _) = take(&job, &scope, "warm", "1-2", 0).unwrap();
            server.join().unwrap();
            std::fs::remove_file(job.api()).unwrap();
            assert_eq!(dir, scope.join("warm"));
            assert_eq!(std::fs::read_to_string(dir.join("state")).unwrap(), tag);
        }
        let server = fake_api(job.api(), 1, "fail");
        let err = take(&job, &scope, "warm", "1-2", 0).unwrap_err();
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
