//! A job's `image:` that is neither an image directory nor a store image is a registry
//! reference (`alpine:3.20`, `registry.example:5000/team/tools:1`): the driver pulls it
//! into kiln's image store with `kiln image pull`, as GitLab's Docker executor pulls a
//! job's image, and boots it like any store image.
//!
//! - **Where it goes.** Each reference gets a store name of its own, readable and unique:
//!   its last path part and a hash of the whole reference as the job wrote it
//!   (`tools:1-3f9a2c1d4e5f`), so that references that differ only in their registry or
//!   namespace never share an image, and an operator's own store names are never replaced.
//! - **Pull policy**, as the Docker executor's: `always` asks the registry every time (kiln
//!   fetches only the manifest when the store has its digest already, and replaces the
//!   image when the tag moved), `if-not-present` pulls only what the store lacks, `never`
//!   uses the store alone. Several policies are tried in order until one succeeds. A job
//!   may choose its own (`image: pull_policy:` in `.gitlab-ci.yml`, which reaches the
//!   driver in the job response) among `allowed_pull_policies`.
//! - **Credentials**: the job's `DOCKER_AUTH_CONFIG` variable when set (as GitLab's Docker
//!   executor takes it), else kiln's own lookup (the driver's `$DOCKER_AUTH_CONFIG`, then
//!   Docker's config files).
//! - **Failures** are system failures that quote kiln's one line, which says what the
//!   registry answered.
//!
//! Two jobs pulling one reference at once take turns on a lock file, so that the second
//! finds the first one's image instead of fetching it again.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// When a job's image is fetched from its registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl std::str::FromStr for PullPolicy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "always" => Ok(PullPolicy::Always),
            "if-not-present" => Ok(PullPolicy::IfNotPresent),
            "never" => Ok(PullPolicy::Never),
            _ => bail!("unknown pull policy {s:?}: use always, if-not-present or never"),
        }
    }
}

impl std::fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PullPolicy::Always => "always",
            PullPolicy::IfNotPresent => "if-not-present",
            PullPolicy::Never => "never",
        })
    }
}

/// One policy or a list of them, as the config file may write either.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Policies {
    One(PullPolicy),
    Many(Vec<PullPolicy>),
}

impl Policies {
    pub fn into_vec(self) -> Vec<PullPolicy> {
        match self {
            Policies::One(p) => vec![p],
            Policies::Many(v) => v,
        }
    }
}

fn list(policies: &[PullPolicy]) -> String {
    policies
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The policies for this job: the job's own (`image: pull_policy:`, from the job response)
/// if it names any, each of which must be allowed; else the driver's.
pub fn job_policies(
    driver: &[PullPolicy],
    allowed: &[PullPolicy],
    job: &[String],
) -> Result<Vec<PullPolicy>> {
    if job.is_empty() {
        return Ok(driver.to_vec());
    }
    let mut out = Vec::new();
    for name in job {
        let policy: PullPolicy = name
            .parse()
            .with_context(|| "the job's image pull_policy".to_string())?;
        if !allowed.contains(&policy) {
            bail!(
                "the job's image pull_policy {policy} is not allowed on this runner \
                 (allowed_pull_policies: {})",
                list(allowed)
            );
        }
        out.push(policy);
    }
    Ok(out)
}

/// `image.pull_policy` of the job response file (GitLab's `.gitlab-ci.yml` `image:
/// pull_policy:`), empty when the job names none.
pub fn response_policies(response_file: Option<&Path>) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Response {
        #[serde(default)]
        image: Option<Image>,
    }
    #[derive(Deserialize)]
    struct Image {
        #[serde(default)]
        pull_policy: Option<Vec<String>>,
    }
    let Some(path) = response_file else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the job response file {}", path.display()))?;
    let r: Response = serde_json::from_str(&text)
        .with_context(|| format!("the job response file {} is not JSON", path.display()))?;
    Ok(r.image.and_then(|i| i.pull_policy).unwrap_or_default())
}

/// The store name the driver keeps `reference` under: its last path part (without a
/// digest), cut to a length that leaves room, and 12 hex digits of its SHA-256.
pub fn store_name(reference: &str) -> String {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    let last = last.split('@').next().unwrap_or(last);
    let mut base: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':') {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    if !base.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        base.insert(0, 'i');
    }
    let hash = format!("{:x}", Sha256::digest(reference.as_bytes()));
    format!("{base}-{}", &hash[..12])
}

/// What fetches an image: `kiln image pull`, or a test's stand-in.
pub trait Puller {
    /// Pulls `reference` into the store as `name` (replacing an older image of that name);
    /// returns a line for the job log, or the reason it failed.
    fn pull(&self, reference: &str, name: &str) -> Result<String, String>;
}

/// Makes sure the store holds `reference` as the policies ask; returns its store name.
pub fn resolve(
    store: &Path,
    lock_dir: &Path,
    reference: &str,
    policies: &[PullPolicy],
    puller: &dyn Puller,
) -> Result<String> {
    let name = store_name(reference);
    let present = || store.join(&name).join("rootfs.ext4").is_file();
    let _lock = lock(lock_dir, &name)?;
    let mut failures = Vec::new();
    for policy in policies {
        let result = match policy {
            PullPolicy::Never | PullPolicy::IfNotPresent if present() => Ok(None),
            PullPolicy::Never => Err(format!(
                "pull_policy never: the store {} does not have it",
                store.display()
            )),
            PullPolicy::IfNotPresent | PullPolicy::Always => {
                puller.pull(reference, &name).map(Some)
            }
        };
        match result {
            Ok(line) => {
                if let Some(line) = line {
                    println!("kiln-gitlab: {line}");
                }
                return Ok(name);
            }
            Err(reason) => failures.push(format!("{policy}: {reason}")),
        }
    }
    if policies.is_empty() {
        bail!("cannot get image {reference:?}: no pull policy is set");
    }
    bail!(
        "cannot get image {reference:?} (pull policies tried: {})",
        failures.join("; ")
    )
}

/// An exclusive lock on `<dir>/<name>.lock`, held until dropped.
fn lock(dir: &Path, name: &str) -> Result<File> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("{name}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on an fd we own; no pointers. Blocking: the other pull ends by itself
    // (or with its job, whose timeout the runner enforces).
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot lock {}", path.display()));
    }
    Ok(file)
}

/// `kiln image pull`, run by the driver.
pub struct KilnPull<'a> {
    pub kiln: &'a Path,
    pub store: &'a Path,
    pub insecure: &'a [String],
    /// The job's `DOCKER_AUTH_CONFIG`, if it set one.
    pub auth_config: Option<&'a str>,
    /// The jails' group, which must be able to read the image's disk (see [`share`]).
    pub jail_gid: Option<u32>,
}

/// Makes store image `name`'s disk readable by the jails' group `gid` (root's, `0640`), as
/// snapshots are: the driver's umask made it root's alone, and a jail links in only a file
/// its VMM can read (otherwise it copies it, which costs the whole disk per job and gives
/// each copy a new modification time that no snapshot of the image matches).
pub fn share(store: &Path, name: &str, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let disk = store.join(name).join("rootfs.ext4");
    std::os::unix::fs::chown(&disk, Some(0), Some(gid))?;
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o640))
}

impl Puller for KilnPull<'_> {
    fn pull(&self, reference: &str, name: &str) -> Result<String, String> {
        let mut cmd = Command::new(self.kiln);
        cmd.args([
            "image", "pull", reference, "--name", name, "--force", "--json",
        ])
        .arg("--store")
        .arg(self.store);
        for host in self.insecure {
            cmd.args(["--insecure-registry", host]);
        }
        if let Some(json) = self.auth_config {
            cmd.env("DOCKER_AUTH_CONFIG", json);
        }
        let start = Instant::now();
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.kiln.display()))?;
        if !out.status.success() {
            // kiln's error line; anything else (a crash) in full, bounded.
            let stderr = String::from_utf8_lossy(&out.stderr);
            let said = match stderr.lines().find_map(|l| l.strip_prefix("kiln: error: ")) {
                Some(line) => line.to_string(),
                None if stderr.trim().is_empty() => {
                    format!("kiln image pull exited with {}", out.status)
                }
                None => format!(
                    "kiln image pull exited with {}: {}",
                    out.status,
                    stderr.trim().chars().take(2000).collect::<String>()
                ),
            };
            return Err(said);
        }
        if let Some(gid) = self.jail_gid {
            share(self.store, name, gid)
                .map_err(|e| format!("cannot give the jails' group the image's disk: {e}"))?;
        }
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let digest = json["digest"].as_str().unwrap_or("?");
        let how = if json["fetched"].as_bool() == Some(false) {
            "the store had it"
        } else {
            "fetched"
        };
        Ok(format!(
            "pulled {reference} ({digest}, {how}) as store image {name:?} in {:.1} s",
            start.elapsed().as_secs_f64()
        ))
    }
}

/// The directory of the pull locks under the driver's state.
pub fn lock_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("pulls")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Records its calls; "pulls" by making the store entry, or fails with `fail`.
    struct Fake<'a> {
        store: &'a Path,
        calls: RefCell<Vec<String>>,
        fail: Option<&'static str>,
    }

    impl Puller for Fake<'_> {
        fn pull(&self, reference: &str, name: &str) -> Result<String, String> {
            self.calls.borrow_mut().push(reference.to_string());
            if let Some(reason) = self.fail {
                return Err(reason.to_string());
            }
            std::fs::create_dir_all(self.store.join(name)).unwrap();
            std::fs::write(self.store.join(name).join("rootfs.ext4"), b"fs").unwrap();
            Ok(format!("pulled {reference}"))
        }
    }

    #[test]
    fn names_are_readable_unique_and_valid() {
        let a = store_name("127.0.0.1:5000/tools/bb:1");
        let b = store_name("127.0.0.1:5001/tools/bb:1");
        assert!(a.starts_with("bb:1-") && b.starts_with("bb:1-"), "{a} {b}");
        assert_ne!(a, b);
        assert_eq!(a, store_name("127.0.0.1:5000/tools/bb:1"));
        let d = store_name(&format!("alpine@sha256:{}", "ab".repeat(32)));
        assert!(d.starts_with("alpine-"), "{d}");
        let long = store_name(&format!("r/{}:{}", "x".repeat(80), "t"));
        for n in [a, d, long, store_name("_odd/.name")] {
            assert!(n.len() <= 64, "{n}");
            crate::store::check_name("image", &n).unwrap();
        }
    }

    #[test]
    fn shared_disks_are_the_jails_groups_to_read() {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: getgid has no preconditions.
        let gid = unsafe { libc::getgid() };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // only root can give a file to root
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("img")).unwrap();
        std::fs::write(dir.path().join("img/rootfs.ext4"), b"fs").unwrap();
        share(dir.path(), "img", gid).unwrap();
        let m = std::fs::metadata(dir.path().join("img/rootfs.ext4")).unwrap();
        assert_eq!((m.mode() & 0o777, m.uid(), m.gid()), (0o640, 0, gid));
    }

    #[test]
    fn policies_come_from_the_job_if_allowed() {
        use PullPolicy::*;
        let driver = [Always];
        let allowed = [Always, IfNotPresent];
        assert_eq!(job_policies(&driver, &allowed, &[]).unwrap(), [Always]);
        let job = ["if-not-present".to_string()];
        assert_eq!(
            job_policies(&driver, &allowed, &job).unwrap(),
            [IfNotPresent]
        );
        let e = job_policies(&driver, &allowed, &["never".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("not allowed"), "{e:#}");
        assert!(job_policies(&driver, &allowed, &["sometimes".into()]).is_err());
    }

    #[test]
    fn response_files_name_the_jobs_policy() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("r.json");
        std::fs::write(
            &f,
            r#"{"id":1,"image":{"name":"a","pull_policy":["never"]}}"#,
        )
        .unwrap();
        assert_eq!(response_policies(Some(&f)).unwrap(), ["never"]);
        std::fs::write(&f, r#"{"id":1,"image":{"name":"a"}}"#).unwrap();
        assert!(response_policies(Some(&f)).unwrap().is_empty());
        std::fs::write(&f, r#"{"id":1}"#).unwrap();
        assert!(response_policies(Some(&f)).unwrap().is_empty());
        assert!(response_policies(None).unwrap().is_empty());
    }

    #[test]
    fn each_policy_pulls_or_not_as_the_docker_executor() {
        use PullPolicy::*;
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let locks = dir.path().join("locks");
        let r = "127.0.0.1:5000/bb:1";
        let fake = Fake {
            store: &store,
            calls: RefCell::new(Vec::new()),
            fail: None,
        };
        let calls = |f: &Fake| f.calls.borrow().len();

        let e = resolve(&store, &locks, r, &[Never], &fake).unwrap_err();
        assert!(format!("{e:#}").contains("never"), "{e:#}");
        assert_eq!(calls(&fake), 0);
        let name = resolve(&store, &locks, r, &[IfNotPresent], &fake).unwrap();
        assert_eq!((name.clone(), calls(&fake)), (store_name(r), 1));
        resolve(&store, &locks, r, &[IfNotPresent], &fake).unwrap();
        resolve(&store, &locks, r, &[Never], &fake).unwrap();
        assert_eq!(calls(&fake), 1, "present: neither pulls");
        resolve(&store, &locks, r, &[Always], &fake).unwrap();
        assert_eq!(calls(&fake), 2, "always asks the registry");

        // A failing registry: always fails, always-then-if-not-present falls back to the
        // stored image, and the message carries what the registry answered.
        let down = Fake {
            store: &store,
            calls: RefCell::new(Vec::new()),
            fail: Some("manifest unknown"),
        };
        let e = resolve(&store, &locks, r, &[Always], &down).unwrap_err();
        assert!(
            format!("{e:#}").contains("always: manifest unknown"),
            "{e:#}"
        );
        assert_eq!(
            resolve(&store, &locks, r, &[Always, IfNotPresent], &down).unwrap(),
            name
        );
        let other = "127.0.0.1:5000/other:1";
        let e = resolve(&store, &locks, other, &[IfNotPresent, Never], &down).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("if-not-present: manifest unknown; never: pull_policy never"),
            "{e}"
        );
        assert!(!store.join(store_name(other)).exists());
    }
}
