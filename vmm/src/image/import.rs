//! `kiln image import`: an image from a tarball of a filesystem, such as `docker export`
//! writes for a container, with the agent installed as init.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::rootfs;
use super::{find_tool, require_root, run_tool, sha256_file, ImageError, ImageMeta, Source, Store};

/// What to import.
#[derive(Debug, Clone)]
pub struct ImportSpec {
    pub name: String,
    /// A tar archive, plain or compressed (GNU tar recognizes gzip, xz, zstd…).
    pub tarball: PathBuf,
    pub size_mib: Option<u64>,
    pub agent: PathBuf,
    pub force: bool,
}

/// Imports the tarball into `store`; returns the image's directory and metadata.
pub fn import(store: &Store, spec: &ImportSpec) -> Result<(PathBuf, ImageMeta), ImageError> {
    require_root(
        "kiln image import",
        "the archive's owners, modes and device nodes are kept only when root extracts it",
    )?;
    let tar = find_tool("tar", "tar")?;
    rootfs::mkfs()?;
    let tarball = absolute(&spec.tarball)?;
    if tarball.is_dir() {
        return Err(ImageError::Io {
            what: "the tarball is a directory, not an archive:",
            path: tarball,
            source: std::io::Error::from(std::io::ErrorKind::IsADirectory),
        });
    }
    // The name is checked before the (possibly long) read of the tarball.
    let staging = store.stage(&spec.name, spec.force)?;
    let sha256 = sha256_file(&tarball)?;
    let tree = staging.tree();
    std::fs::create_dir(&tree).map_err(ImageError::io("cannot create", &tree))?;
    let mut cmd = Command::new(tar);
    cmd.args(["--extract", "--preserve-permissions", "--same-owner"])
        .args(["--numeric-owner", "--xattrs", "--xattrs-include=*"])
        .arg("--file")
        .arg(&tarball)
        .arg("--directory")
        .arg(&tree);
    run_tool(
        cmd,
        format!("extracting {}", tarball.display()),
        "; it must be a tar archive of a filesystem (what `docker export` writes)",
    )?;
    let source = Source::Import { tarball, sha256 };
    rootfs::finish(staging, &spec.name, source, &spec.agent, spec.size_mib)
}

/// `path` made absolute, so that the metadata names the tarball wherever ls runs from.
fn absolute(path: &Path) -> Result<PathBuf, ImageError> {
    std::path::absolute(path).map_err(ImageError::io("cannot resolve", path))
}
