//! Debian's cloud kernel (`linux-image-cloud-amd64`), for the tests that boot a
//! distribution kernel: its newest package fetched with `apt-get download` and unpacked
//! once into `${KILN_CACHE_DIR:-$HOME/.cache/kiln}/kernels/debian-<version>/` (the
//! `vmlinuz`, its `config` and the virtio modules it needs to find virtio-mmio devices).
//! Without the network, the newest version already cached is used.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::tmp::TempDir;

/// The meta-package that depends on the newest cloud kernel.
const META_PACKAGE: &str = "linux-image-cloud-amd64";
/// The modules virtio-mmio devices need in this kernel, in the order to load them.
pub const VIRTIO_MODULES: &[&str] = &["virtio_ring", "virtio", "virtio_mmio"];

/// One unpacked cloud kernel.
#[derive(Debug, Clone)]
pub struct DistroKernel {
    /// Its release, e.g. `6.1.0-57-cloud-amd64`.
    pub release: String,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// The kernel's build configuration.
    pub config: PathBuf,
    /// `<name>.ko` for each of [`VIRTIO_MODULES`].
    pub modules: PathBuf,
}

impl DistroKernel {
    fn in_dir(dir: &Path, release: &str) -> Option<Self> {
        let kernel = DistroKernel {
            release: release.to_string(),
            vmlinuz: dir.join("vmlinuz"),
            config: dir.join("config"),
            modules: dir.join("modules"),
        };
        let complete = kernel.vmlinuz.is_file()
            && kernel.config.is_file()
            && VIRTIO_MODULES
                .iter()
                .all(|m| kernel.modules.join(format!("{m}.ko")).is_file());
        complete.then_some(kernel)
    }

    /// The value of `CONFIG_<name>` in its config (`y`, `m`, …), or None if unset.
    pub fn config_value(&self, name: &str) -> Result<Option<String>> {
        let text = std::fs::read_to_string(&self.config)
            .with_context(|| format!("reading {}", self.config.display()))?;
        let key = format!("CONFIG_{name}=");
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .map(str::to_string))
    }
}

fn cache_root() -> PathBuf {
    std::env::var_os("KILN_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kiln")))
        .unwrap_or_else(|| PathBuf::from("/var/cache/kiln"))
        .join("kernels")
}

/// The newest Debian cloud kernel, from the cache or fetched and unpacked into it.
pub fn debian_cloud() -> Result<DistroKernel> {
    let root = cache_root();
    match newest_package() {
        Ok(package) => {
            let release = package
                .strip_prefix("linux-image-")
                .with_context(|| format!("{META_PACKAGE} depends on {package}"))?
                .to_string();
            let dir = root.join(format!("debian-{release}"));
            if let Some(kernel) = DistroKernel::in_dir(&dir, &release) {
                return Ok(kernel);
            }
            unpack(&package, &release, &dir)?;
            DistroKernel::in_dir(&dir, &release)
                .with_context(|| format!("{} is incomplete after unpacking", dir.display()))
        }
        Err(e) => newest_cached(&root).with_context(|| {
            format!(
                "{e:#}; and no Debian cloud kernel is cached in {}",
                root.display()
            )
        }),
    }
}

/// The package `linux-image-cloud-amd64` depends on (apt's view of the newest).
fn newest_package() -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", "--no-recommends", "--no-suggests", META_PACKAGE])
        .output()
        .context("running apt-cache (is this Debian?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let package = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"));
    match (out.status.success(), package) {
        (true, Some(p)) => Ok(p.to_string()),
        _ => bail!(
            "apt-cache knows no {META_PACKAGE} (run apt-get update): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Downloads `package` and moves its kernel, config and virtio modules into `dir`.
fn unpack(package: &str, release: &str, dir: &Path) -> Result<()> {
    let tmp = TempDir::new("debian-kernel")?;
    run(
        Command::new("apt-get")
            .current_dir(tmp.path())
            .args(["download", "-q", package]),
        &format!("apt-get download {package}"),
    )?;
    let deb = std::fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    let root = tmp.path().join("root");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        "dpkg-deb -x",
    )?;
    // Fill a sibling directory, then rename it into place: a run killed half-way leaves
    // no partial kernel behind in the cache.
    let staging = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(staging.join("modules"))?;
    let boot = root.join("boot");
    std::fs::copy(
        boot.join(format!("vmlinuz-{release}")),
        staging.join("vmlinuz"),
    )
    .context("the package has no /boot/vmlinuz")?;
    std::fs::copy(
        boot.join(format!("config-{release}")),
        staging.join("config"),
    )
    .context("the package has no /boot/config")?;
    let virtio = root.join(format!("lib/modules/{release}/kernel/drivers/virtio"));
    for module in VIRTIO_MODULES {
        let name = format!("{module}.ko");
        std::fs::copy(virtio.join(&name), staging.join("modules").join(&name))
            .with_context(|| format!("the package has no {name} (compressed modules?)"))?;
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&staging, dir)
        .with_context(|| format!("moving the kernel into {}", dir.display()))?;
    Ok(())
}

/// The complete `debian-*` kernel in the cache whose release sorts last.
fn newest_cached(root: &Path) -> Result<DistroKernel> {
    let mut found: Vec<DistroKernel> = std::fs::read_dir(root)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let release = name.strip_prefix("debian-")?.to_string();
            DistroKernel::in_dir(&e.path(), &release)
        })
        .collect();
    found.sort_by(|a, b| a.release.cmp(&b.release));
    found.pop().context("none found")
}
