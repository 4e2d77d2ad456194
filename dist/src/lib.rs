//! kiln's Debian package, built by `cargo xtask dist` and by the package's end-to-end test
//! through [`build`]: the static binaries, the guest kernel and default agent initramfs,
//! the systemd units, manual pages and completions made from the clap definitions, and the
//! Debian metadata, packed by `dpkg-deb --build --root-owner-group`.

pub mod debian;
pub mod manuals;
mod source;
pub mod tree;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use kiln::defaults::{INITRAMFS_FILE, KERNEL_FILE, SYSTEM_HOME};
use kiln_tests::artifacts;
use kiln_tests::guest_initramfs::GuestInitramfs;

use tree::Tree;

/// The systemd units, installed as they are.
pub const UNITS: &[(&str, &str)] = &[
    (
        "kiln-nesting.service",
        include_str!("../systemd/kiln-nesting.service"),
    ),
    (
        "kiln-net@.service",
        include_str!("../systemd/kiln-net@.service"),
    ),
];
/// Where the units go.
pub const UNIT_DIR: &str = "/usr/lib/systemd/system";
/// The package's documentation directory.
pub const DOC_DIR: &str = "/usr/share/doc/kiln";

/// The package version: the workspace's version and the Debian revision.
pub fn version() -> String {
    format!("{}-{}", env!("CARGO_PKG_VERSION"), debian::REVISION)
}

/// `kiln_VERSION_amd64.deb`.
pub fn file_name() -> String {
    format!("{}_{}_amd64.deb", debian::PACKAGE, version())
}

/// A built package.
#[derive(Debug, Clone)]
pub struct Package {
    pub deb: PathBuf,
    pub version: String,
}

/// Builds the package into `out_dir` (made if missing): the static release binaries of
/// this checkout (or `$KILN_STATIC_BIN_DIR`'s), the cached guest kernel (built first if
/// need be), a fresh agent initramfs. The staging tree `out_dir/kiln_VERSION_amd64/` is
/// left for inspection.
pub fn build(out_dir: &Path) -> Result<Package> {
    let source = source::Source::describe()?;
    let version = version();
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let staging = out_dir.join(format!("{}_{version}_amd64", debian::PACKAGE));
    let mut tree = Tree::new(&staging)?;

    let bins = artifacts::static_binaries()?;
    for (name, path) in [
        ("kiln", &bins.kiln),
        ("kiln-agent", &bins.kiln_agent),
        ("kiln-gitlab", &bins.kiln_gitlab),
    ] {
        let installed = format!("/usr/bin/{name}");
        tree.file(&installed, 0o755, &read(path)?)?;
        strip(&tree.staged(&installed))?;
    }
    let kernel = kiln_tests::kernels::guest().context("building the guest kernel")?;
    let vmlinux = format!("{SYSTEM_HOME}/{KERNEL_FILE}");
    tree.file(&vmlinux, 0o644, &read(&kernel.vmlinux)?)?;
    strip(&tree.staged(&vmlinux))?;
    let initramfs = GuestInitramfs::new()
        .build()
        .context("building the agent initramfs")?;
    tree.file(
        &format!("{SYSTEM_HOME}/{INITRAMFS_FILE}"),
        0o644,
        &initramfs,
    )?;
    for (name, text) in UNITS {
        tree.file(&format!("{UNIT_DIR}/{name}"), 0o644, text.as_bytes())?;
    }
    manuals::install(&mut tree, &source.day)?;
    tree.file(
        &format!("{DOC_DIR}/copyright"),
        0o644,
        debian::copyright(&source.years).as_bytes(),
    )?;
    let changelog = debian::changelog(&version, &source.commit, &source.maintainer, &source.date);
    tree.gz_file(
        &format!("{DOC_DIR}/changelog.Debian.gz"),
        changelog.as_bytes(),
    )?;
    tree.file(
        "/usr/share/lintian/overrides/kiln",
        0o644,
        debian::lintian_overrides().as_bytes(),
    )?;
    let upstream = kiln_tests::kernels::repo_root().join("CHANGELOG.md");
    tree.gz_file(&format!("{DOC_DIR}/changelog.gz"), &read(&upstream)?)?;

    let control = debian::Control {
        version: version.clone(),
        maintainer: source.maintainer.clone(),
        installed_size_kib: tree.installed_size_kib()?,
        built_using: source.built_using.clone(),
    };
    tree.control("control", 0o644, control.render().as_bytes())?;
    tree.control("md5sums", 0o644, md5sums(&tree)?.as_bytes())?;

    let deb = out_dir.join(file_name());
    stdout_of(
        Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group"])
            .arg(tree.root())
            .arg(&deb)
            // The archive's time stamps: the commit's, so that a rebuild gives the same bytes.
            .env("SOURCE_DATE_EPOCH", source.epoch.to_string()),
        "dpkg-deb --build (Debian package `dpkg`)",
    )?;
    Ok(Package { deb, version })
}

/// Runs lintian (Debian package `lintian`) on `deb` and returns its findings, one per line;
/// an error if it reports an error (its `--fail-on` default).
pub fn lintian(deb: &Path) -> Result<String> {
    stdout_of(
        Command::new("lintian")
            .args(["--fail-on", "error"])
            .arg(deb),
        "lintian (cargo xtask setup installs it)",
    )
}

/// Strips the symbols of the ELF file `path` in place, as Debian's packaging does
/// (`dh_strip`): backtraces lose their function names, the package gets smaller.
/// Notes are kept: the guest kernel's PVH entry point is one.
fn strip(path: &Path) -> Result<()> {
    stdout_of(
        Command::new("strip")
            .args(["--strip-unneeded", "--remove-section=.comment"])
            .arg(path),
        "strip (Debian package `binutils`)",
    )
    .map(drop)
}

/// `DEBIAN/md5sums`: `md5sum` of every regular file, by its path without the leading `/`.
fn md5sums(tree: &Tree) -> Result<String> {
    let relative: Vec<&str> = tree.files().iter().map(|f| &f[1..]).collect();
    stdout_of(
        Command::new("md5sum")
            .current_dir(tree.root())
            .arg("--")
            .args(&relative),
        "md5sum",
    )
}

/// Runs `cmd` and returns its stdout; if it cannot start or fails, an error naming it as
/// `what` and quoting what it printed.
pub(crate) fn stdout_of(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}
