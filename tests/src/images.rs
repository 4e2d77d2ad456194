//! Store images for the `image_` tests, made on the host with the static `kiln image …`.
//!
//! A Debian image costs a debootstrap (about a minute or more, network included), so it is
//! cached in an image store under `${KILN_CACHE_DIR:-$HOME/.cache/kiln}/images`, named by
//! a hash of everything that goes into it (suite, packages, size, the agent's bytes): CI
//! pays for it once per change of those.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::artifacts::StaticBinaries;

/// An image in a store, ready to hand to a test bed.
#[derive(Debug, Clone)]
pub struct StoreImage {
    pub store: PathBuf,
    pub name: String,
    /// How long `kiln image build|import` took; `None` when it came from the cache.
    pub build_secs: Option<f64>,
}

impl StoreImage {
    /// The image's directory.
    pub fn dir(&self) -> PathBuf {
        self.store.join(&self.name)
    }

    /// Its two files as `files` entries for [`crate::Runner::run`], under `<prefix>/<name>/`,
    /// so that `--store $FILES/<prefix>` finds it in the test bed.
    pub fn files(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        ["rootfs.ext4", "image.json"]
            .iter()
            .map(|f| {
                let path = self.dir().join(f);
                let data =
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                Ok((format!("{prefix}/{}/{f}", self.name), data))
            })
            .collect()
    }
}

/// The cached image store.
pub fn cache_store() -> PathBuf {
    std::env::var_os("KILN_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kiln")))
        .unwrap_or_else(|| PathBuf::from("/var/cache/kiln"))
        .join("images")
}

/// The image the nesting server's VMs boot in the contract test and the benches: Debian
/// bookworm with bash and an SSH server the runner logs into with a password.
pub fn nesting_ssh(bins: &StaticBinaries) -> Result<StoreImage> {
    debian(
        bins,
        "bookworm",
        &["bash", "openssh-server", "passwd"],
        None,
    )
}

/// A Debian `suite` image with `packages`, from the cache or built with `kiln image build`
/// (installing debootstrap first if it is missing).
pub fn debian(
    bins: &StaticBinaries,
    suite: &str,
    packages: &[&str],
    size_mib: Option<u64>,
) -> Result<StoreImage> {
    // One build at a time in this process: tests that want the same image wait for it
    // instead of running debootstrap twice.
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let agent = std::fs::read(&bins.kiln_agent)
        .with_context(|| format!("reading {}", bins.kiln_agent.display()))?;
    // Named by what it is made of (suite, packages, size) and then by the agent it holds,
    // so that a new agent replaces the older builds of the same recipe in the cache.
    let recipe = short_hash(format!("{suite}\0{}\0{size_mib:?}", packages.join(",")).as_bytes());
    let prefix = format!("debian-{suite}-{recipe}-");
    let image = StoreImage {
        store: cache_store(),
        name: format!("{prefix}{}", short_hash(&agent)),
        build_secs: None,
    };
    if image.dir().join("image.json").is_file() {
        return Ok(image);
    }
    for old in std::fs::read_dir(&image.store)
        .into_iter()
        .flatten()
        .flatten()
    {
        if old.file_name().to_string_lossy().starts_with(&prefix) {
            std::fs::remove_dir_all(old.path())
                .with_context(|| format!("removing the stale {}", old.path().display()))?;
        }
    }
    ensure_debootstrap()?;
    let mut cmd = Command::new(&bins.kiln);
    cmd.args(["image", "build", "--name", &image.name, "--debian", suite])
        .arg("--store")
        .arg(&image.store)
        .arg("--agent")
        .arg(&bins.kiln_agent);
    if !packages.is_empty() {
        cmd.arg("--packages").arg(packages.join(","));
    }
    if let Some(mib) = size_mib {
        cmd.arg("--size").arg(mib.to_string());
    }
    match run(cmd, "kiln image build") {
        Ok(secs) => Ok(StoreImage {
            build_secs: Some(secs),
            ..image
        }),
        // Another process built it meanwhile (kiln refuses to overwrite it): use theirs.
        Err(_) if image.dir().join("image.json").is_file() => Ok(image),
        Err(e) => Err(e),
    }
}

/// `kiln image import` of `tarball` as `name` into `store`.
pub fn import(
    bins: &StaticBinaries,
    store: &Path,
    name: &str,
    tarball: &Path,
) -> Result<StoreImage> {
    let mut cmd = Command::new(&bins.kiln);
    cmd.args(["image", "import", "--name", name, "--store"])
        .arg(store)
        .arg("--agent")
        .arg(&bins.kiln_agent)
        .arg(tarball);
    let secs = run(cmd, "kiln image import")?;
    Ok(StoreImage {
        store: store.to_owned(),
        name: name.to_string(),
        build_secs: Some(secs),
    })
}

/// A `docker save` archive at `out` of an image whose layers are the directories
/// `layers` (lowest first; whiteouts are files named `.wh.NAME`) and whose config is
/// `config`; `dir` holds the work files.
pub fn docker_save(
    dir: &Path,
    layers: &[&Path],
    config: &serde_json::Value,
    out: &Path,
) -> Result<()> {
    let save = dir.join("docker-save");
    std::fs::create_dir_all(&save).with_context(|| format!("creating {}", save.display()))?;
    let mut names = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let name = format!("layer{i}.tar");
        tar(layer, &save.join(&name))?;
        names.push(name);
    }
    std::fs::write(save.join("config.json"), config.to_string())?;
    let manifest = serde_json::json!([{
        "Config": "config.json", "RepoTags": ["kiln-test:latest"], "Layers": names,
    }]);
    std::fs::write(save.join("manifest.json"), manifest.to_string())?;
    tar(&save, out)
}

/// `tar -cf OUT -C DIR .`
fn tar(dir: &Path, out: &Path) -> Result<()> {
    let status = Command::new("tar")
        .arg("-cf")
        .arg(out)
        .arg("-C")
        .arg(dir)
        .arg(".")
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!(
            "tar -cf {} -C {} . failed ({status})",
            out.display(),
            dir.display()
        );
    }
    Ok(())
}

/// The first 8 bytes of a SHA-256, hex.
fn short_hash(data: &[u8]) -> String {
    Sha256::digest(data)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn run(mut cmd: Command, what: &str) -> Result<f64> {
    let start = Instant::now();
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status}); its output is above");
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Installs Debian's debootstrap if it is not there (as `cargo xtask setup` would).
fn ensure_debootstrap() -> Result<()> {
    if ["/usr/sbin/debootstrap", "/sbin/debootstrap"]
        .iter()
        .any(|p| Path::new(p).is_file())
    {
        return Ok(());
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "debootstrap"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get to install debootstrap")?;
    if !status.success() {
        bail!("apt-get install debootstrap failed ({status}); run `cargo xtask setup` as root");
    }
    Ok(())
}
