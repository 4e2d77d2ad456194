//! The driver's own configuration: a TOML file (`--config`, else `$KILN_GITLAB_CONFIG`,
//! else `/etc/kiln-gitlab/config.toml` if it exists), every key optional.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Where the driver looks for its config when neither `--config` nor
/// `$KILN_GITLAB_CONFIG` names one.
pub const DEFAULT_CONFIG: &str = "/etc/kiln-gitlab/config.toml";

/// The configuration file's keys; `docs/gitlab.md` describes each.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The `kiln` binary. Default: `kiln` beside `kiln-gitlab`, else `kiln` on PATH.
    pub kiln: Option<PathBuf>,
    /// Per-job state (sockets, pid file, logs). Default: `$KILN_GITLAB_STATE_DIR`, else
    /// `$XDG_RUNTIME_DIR/kiln-gitlab`, else `/run/kiln-gitlab`.
    pub state_dir: Option<PathBuf>,
    /// Guest images: `<images_dir>/<name>/kernel` (+ optional `initrd`). Default
    /// `/var/lib/kiln-gitlab/images`.
    pub images_dir: Option<PathBuf>,
    /// The image of jobs that name none. Default `default`.
    pub default_image: Option<String>,
    /// The kiln image store (`kiln image build|import`), where a `CI_JOB_IMAGE` that is
    /// not in `images_dir` is looked up and booted as the root disk. Default
    /// `$KILN_IMAGE_STORE`, else `/var/lib/kiln/images`.
    pub image_store: Option<PathBuf>,
    /// The kernel that boots store images. Default `<images_dir>/<default_image>/kernel`.
    pub image_kernel: Option<PathBuf>,
    /// Named snapshots. Default `/var/lib/kiln-gitlab/snapshots`.
    pub snapshot_dir: Option<PathBuf>,
    /// Guest memory in MiB. Default 512.
    pub memory_mib: Option<u64>,
    /// vCPUs per guest. Default 1.
    pub vcpus: Option<u64>,
    /// How long `prepare` waits for the guest agent. Default 60 s.
    pub boot_timeout_secs: Option<u64>,
    /// How long a cancelled stage's processes get between SIGTERM and SIGKILL. Default 5 s.
    pub kill_grace_secs: Option<u64>,
    /// The guest's builds and cache directories (the `config` answer). Defaults `/builds`,
    /// `/cache`.
    pub builds_dir: Option<String>,
    pub cache_dir: Option<String>,
    /// The guest's shell for stage scripts. Default `bash`.
    pub shell: Option<String>,
    /// The network of each job's VM: a `kiln run --net` string in which `{id}` stands for
    /// the job's slot (0, 1, … among the jobs running at once, numbered by the driver, see
    /// `slots`), so that each job gets a TAP of its own, e.g.
    /// `tap=kiln{id},ip=10.0.{id}.2/24,gw=10.0.{id}.1,dns=…` after `kiln net setup --tap
    /// kiln{id} --host-ip 10.0.{id}.1/24 --nat` for each id. Default: no network.
    pub net: Option<String>,
    /// How many jobs may run at once: slots 0 … slots-1 (the `{id}` of `net`). Default 16.
    pub slots: Option<u32>,
    /// Run every VM's kiln in `kiln jail` (own root, namespaces, unprivileged ids, no
    /// capabilities). Default true; false runs kiln as the driver's user (root), unconfined.
    pub jail: Option<bool>,
    /// Where the jails are made (`kiln jail --base`). Keep it on the filesystem of
    /// `snapshot_dir`, `images_dir` and `image_store`: files are hard-linked into a jail
    /// (copied across filesystems) and snapshots moved out of it. Default
    /// `/var/lib/kiln-gitlab/jails`.
    pub jail_base: Option<PathBuf>,
    /// A fixed uid for every jailed VMM. Default: none, so that each jail takes a uid of its
    /// own from `jail_uid_range` (one compromised VMM cannot signal or ptrace another job's).
    pub jail_uid: Option<u32>,
    /// The gid of every jailed VMM: the group that may read the snapshots jobs start from
    /// (files `0640`, owned by root). Default [`JAIL_GID`].
    pub jail_gid: Option<u32>,
    /// `START:COUNT`: the uids jails take one each (`kiln jail --uid-range`). Default:
    /// `kiln jail`'s own range.
    pub jail_uid_range: Option<String>,
    /// When a job's registry image is pulled (`crate::pull`): `always`, `if-not-present`,
    /// `never`, or a list of them tried in order. Default `always`, as GitLab's Docker
    /// executor.
    pub pull_policy: Option<crate::pull::Policies>,
    /// The policies a job may choose with `image: pull_policy:`. Default: `pull_policy`'s.
    pub allowed_pull_policies: Option<Vec<crate::pull::PullPolicy>>,
    /// Registries (`HOST[:PORT]`) pulled from over plain HTTP. Default: none.
    pub insecure_registries: Option<Vec<String>>,
    /// Snapshot each store image's VM at agent-ready and start later jobs on that image by
    /// restoring it (`crate::warm`). Default false.
    pub warm_snapshots: Option<bool>,
    /// The disk space warm snapshots may take together, in MiB. Default 16384.
    pub warm_snapshots_max_mib: Option<u64>,
    /// How long an unused warm snapshot is kept, in hours. Default 168.
    pub warm_snapshots_max_age_hours: Option<u64>,
}

/// The default group of jailed VMMs: a number no account uses, like `kiln jail`'s uids.
pub const JAIL_GID: u32 = 1_799_999_999;

/// How VMs are confined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    pub base: PathBuf,
    /// A fixed uid; `None`: a uid of the jail's own from `uid_range`.
    pub uid: Option<u32>,
    /// The jails' group, which snapshots are readable by.
    pub gid: u32,
    pub uid_range: Option<String>,
}

/// The configuration with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub kiln: PathBuf,
    pub state_dir: PathBuf,
    pub images_dir: PathBuf,
    pub default_image: String,
    pub image_store: PathBuf,
    pub image_kernel: PathBuf,
    pub snapshot_dir: PathBuf,
    pub memory_mib: u64,
    pub vcpus: u64,
    pub boot_timeout: Duration,
    pub kill_grace: Duration,
    pub builds_dir: String,
    pub cache_dir: String,
    pub shell: String,
    pub net: Option<String>,
    pub slots: u32,
    /// `None`: VMs run unjailed (`jail = false`).
    pub jail: Option<JailConfig>,
    pub pull_policy: Vec<crate::pull::PullPolicy>,
    pub allowed_pull_policies: Vec<crate::pull::PullPolicy>,
    pub insecure_registries: Vec<String>,
    pub warm_snapshots: bool,
    pub warm_limits: crate::warm::Limits,
}

impl Config {
    /// Loads the file `explicit`, else `$KILN_GITLAB_CONFIG`, else [`DEFAULT_CONFIG`] if
    /// it exists, else the defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Config> {
        let env_path = std::env::var_os("KILN_GITLAB_CONFIG").filter(|p| !p.is_empty());
        let path = explicit
            .map(Path::to_path_buf)
            .or(env_path.map(PathBuf::from))
            .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()));
        let file = match &path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the driver config {}", path.display()))?;
                parse(&text).with_context(|| format!("driver config {}", path.display()))?
            }
            None => ConfigFile::default(),
        };
        Ok(Config::from_file(file, &Env::from_process()))
    }

    pub fn from_file(f: ConfigFile, env: &Env) -> Config {
        let state_dir = f
            .state_dir
            .or_else(|| env.state_dir.clone())
            .or_else(|| env.xdg_runtime_dir.as_ref().map(|d| d.join("kiln-gitlab")))
            .unwrap_or_else(|| "/run/kiln-gitlab".into());
        let images_dir = f
            .images_dir
            .unwrap_or_else(|| "/var/lib/kiln-gitlab/images".into());
        let default_image = f.default_image.unwrap_or_else(|| "default".into());
        let pull_policy = f
            .pull_policy
            .map(crate::pull::Policies::into_vec)
            .unwrap_or_else(|| vec![crate::pull::PullPolicy::Always]);
        Config {
            allowed_pull_policies: f
                .allowed_pull_policies
                .unwrap_or_else(|| pull_policy.clone()),
            pull_policy,
            insecure_registries: f.insecure_registries.unwrap_or_default(),
            warm_snapshots: f.warm_snapshots.unwrap_or(false),
            warm_limits: crate::warm::Limits {
                max_bytes: f
                    .warm_snapshots_max_mib
                    .unwrap_or(16384)
                    .saturating_mul(1 << 20),
                max_age: Duration::from_secs(
                    f.warm_snapshots_max_age_hours
                        .unwrap_or(168)
                        .saturating_mul(3600),
                ),
            },
            kiln: f.kiln.unwrap_or_else(|| default_kiln(env.exe.as_deref())),
            state_dir,
            image_store: f
                .image_store
                .or_else(|| env.image_store.clone())
                .unwrap_or_else(|| "/var/lib/kiln/images".into()),
            image_kernel: f
                .image_kernel
                .unwrap_or_else(|| images_dir.join(&default_image).join("kernel")),
            images_dir,
            default_image,
            snapshot_dir: f
                .snapshot_dir
                .unwrap_or_else(|| "/var/lib/kiln-gitlab/snapshots".into()),
            memory_mib: f.memory_mib.unwrap_or(512),
            vcpus: f.vcpus.unwrap_or(1),
            boot_timeout: Duration::from_secs(f.boot_timeout_secs.unwrap_or(60).max(1)),
            kill_grace: Duration::from_secs(f.kill_grace_secs.unwrap_or(5)),
            builds_dir: f.builds_dir.unwrap_or_else(|| "/builds".into()),
            cache_dir: f.cache_dir.unwrap_or_else(|| "/cache".into()),
            shell: f.shell.unwrap_or_else(|| "bash".into()),
            net: f.net,
            slots: f.slots.unwrap_or(16),
            jail: f.jail.unwrap_or(true).then(|| JailConfig {
                base: f
                    .jail_base
                    .unwrap_or_else(|| "/var/lib/kiln-gitlab/jails".into()),
                uid: f.jail_uid,
                gid: f.jail_gid.unwrap_or(JAIL_GID),
                uid_range: f.jail_uid_range,
            }),
        }
    }
}

/// The parts of the process environment the defaults depend on.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub state_dir: Option<PathBuf>,
    pub xdg_runtime_dir: Option<PathBuf>,
    pub image_store: Option<PathBuf>,
    pub exe: Option<PathBuf>,
}

impl Env {
    pub fn from_process() -> Env {
        let dir = |name| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Env {
            state_dir: dir("KILN_GITLAB_STATE_DIR"),
            xdg_runtime_dir: dir("XDG_RUNTIME_DIR"),
            image_store: dir("KILN_IMAGE_STORE"),
            exe: std::env::current_exe().ok(),
        }
    }
}

fn parse(text: &str) -> Result<ConfigFile> {
    let file: ConfigFile = toml::from_str(text)?;
    if file.memory_mib == Some(0) || file.vcpus == Some(0) || file.slots == Some(0) {
        bail!("memory_mib, vcpus and slots must be at least 1");
    }
    if file.jail_uid == Some(0) || file.jail_gid == Some(0) {
        bail!("jail_uid and jail_gid must not be 0: jailed VMMs run unprivileged");
    }
    if matches!(&file.pull_policy, Some(crate::pull::Policies::Many(v)) if v.is_empty()) {
        bail!("pull_policy must name at least one policy");
    }
    if file.jail_uid.is_some() && file.jail_uid_range.is_some() {
        bail!("jail_uid and jail_uid_range exclude each other: one fixed uid, or one per jail");
    }
    Ok(file)
}

/// `kiln` beside this executable if it is there, else `kiln` (looked up in PATH).
fn default_kiln(exe: Option<&Path>) -> PathBuf {
    exe.and_then(Path::parent)
        .map(|dir| dir.join("kiln"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| "kiln".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = Config::from_file(ConfigFile::default(), &Env::default());
        assert_eq!(c.state_dir, PathBuf::from("/run/kiln-gitlab"));
        assert_eq!(c.kiln, PathBuf::from("kiln"));
        assert_eq!((c.memory_mib, c.vcpus, c.shell.as_str()), (512, 1, "bash"));
        assert_eq!(c.slots, 16);
        assert_eq!(
            c.jail,
            Some(JailConfig {
                base: "/var/lib/kiln-gitlab/jails".into(),
                uid: None,
                gid: JAIL_GID,
                uid_range: None,
            }),
            "jailed by default"
        );
        assert_eq!(c.image_store, PathBuf::from("/var/lib/kiln/images"));
        assert_eq!(
            c.image_kernel,
            PathBuf::from("/var/lib/kiln-gitlab/images/default/kernel")
        );
        let env = Env {
            xdg_runtime_dir: Some("/run/user/7".into()),
            ..Env::default()
        };
        let c = Config::from_file(ConfigFile::default(), &env);
        assert_eq!(c.state_dir, PathBuf::from("/run/user/7/kiln-gitlab"));
        let env = Env {
            state_dir: Some("/s".into()),
            ..env
        };
        assert_eq!(
            Config::from_file(ConfigFile::default(), &env).state_dir,
            PathBuf::from("/s")
        );
        let file = parse("state_dir = \"/x\"\nmemory_mib = 256\nkiln = \"/opt/kiln\"\n").unwrap();
        let c = Config::from_file(file, &env);
        assert_eq!(c.state_dir, PathBuf::from("/x"));
        assert_eq!((c.memory_mib, c.kiln), (256, PathBuf::from("/opt/kiln")));
        let c = Config::from_file(parse("jail = false\nslots = 4\n").unwrap(), &env);
        assert_eq!((c.jail, c.slots), (None, 4));
        let c = Config::from_file(parse("jail_base = \"/j\"\njail_uid = 900\n").unwrap(), &env);
        let jail = c.jail.unwrap();
        assert_eq!(
            (jail.base, jail.uid, jail.gid),
            ("/j".into(), Some(900), JAIL_GID)
        );
        let c = Config::from_file(parse("jail_uid_range = \"5000:10\"\n").unwrap(), &env);
        assert_eq!(c.jail.unwrap().uid_range.as_deref(), Some("5000:10"));
        use crate::pull::PullPolicy::*;
        assert_eq!(
            (c.pull_policy, c.allowed_pull_policies),
            (vec![Always], vec![Always])
        );
        let c = Config::from_file(
            parse(
                "pull_policy = [\"always\", \"if-not-present\"]\n\
                 allowed_pull_policies = [\"never\"]\ninsecure_registries = [\"127.0.0.1:5000\"]\n",
            )
            .unwrap(),
            &env,
        );
        assert_eq!(c.pull_policy, [Always, IfNotPresent]);
        assert_eq!(c.allowed_pull_policies, [Never]);
        assert_eq!(c.insecure_registries, ["127.0.0.1:5000"]);
        assert!(!c.warm_snapshots);
        let c = Config::from_file(
            parse("warm_snapshots = true\nwarm_snapshots_max_mib = 2\n").unwrap(),
            &env,
        );
        assert!(c.warm_snapshots);
        assert_eq!(c.warm_limits.max_bytes, 2 << 20);
        assert_eq!(c.warm_limits.max_age, Duration::from_secs(168 * 3600));
        let c = Config::from_file(parse("pull_policy = \"never\"\n").unwrap(), &env);
        assert_eq!(
            (c.pull_policy, c.allowed_pull_policies),
            (vec![Never], vec![Never])
        );
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(parse("memroy_mib = 1\n").is_err(), "unknown keys are typos");
        assert!(parse("vcpus = 0\n").is_err());
        assert!(parse("slots = 0\n").is_err());
        assert!(parse("jail_uid = 0\n").is_err());
        assert!(parse("jail_uid = 9\njail_uid_range = \"5000:10\"\n").is_err());
        assert!(parse("jail = \"no\"\n").is_err());
        assert!(parse("memory_mib = \"big\"\n").is_err());
        assert!(parse("pull_policy = \"sometimes\"\n").is_err());
        assert!(parse("pull_policy = []\n").is_err());
    }
}
