//! `kiln image build`: a Debian root filesystem made with debootstrap, trimmed of what a CI
//! job never reads, with the agent as init.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::rootfs;
use super::{find_tool, require_root, run_tool, ImageError, ImageMeta, Source, Store};

/// Debian's mirror, the one package source reachable from CI machines of this kind.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    pub name: String,
    pub suite: String,
    pub mirror: String,
    /// Packages on top of debootstrap's `minbase` variant (essential + apt).
    pub packages: Vec<String>,
    /// The filesystem size; `None` sizes it to the tree (see [`rootfs::auto_size_mib`]).
    pub size_mib: Option<u64>,
    pub agent: PathBuf,
    pub force: bool,
}

/// What the image need not carry: the package download cache and indexes (a job that
/// installs packages runs `apt-get update` anyway), and documentation, manual pages and
/// translations. Together half of a minbase tree; `apt list --installed` still works (it
/// reads dpkg's status file).
const TRIM: &[&str] = &[
    "var/cache/apt",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
];

/// Builds the image into `store`; returns its directory and metadata.
pub fn build(store: &Store, spec: &BuildSpec) -> Result<(PathBuf, ImageMeta), ImageError> {
    require_root(
        "kiln image build",
        "debootstrap chroots into the new tree and creates its device nodes and root-owned files",
    )?;
    let debootstrap = find_tool("debootstrap", "debootstrap")?;
    rootfs::mkfs()?;
    for p in &spec.packages {
        if p.is_empty()
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.:".contains(c))
        {
            return Err(ImageError::BadPackage(p.clone()));
        }
    }
    // Refuses an existing name now, not after minutes of debootstrap.
    let staging = store.stage(&spec.name, spec.force)?;
    let tree = staging.tree();
    let mut cmd = Command::new(debootstrap);
    cmd.arg("--variant=minbase");
    if !spec.packages.is_empty() {
        cmd.arg(format!("--include={}", spec.packages.join(",")));
    }
    cmd.arg(&spec.suite).arg(&tree).arg(&spec.mirror);
    run_tool(
        cmd,
        format!("debootstrap of {} from {}", spec.suite, spec.mirror),
        &format!(
            "; its output is above (a log may remain in {}/debootstrap/debootstrap.log until kiln \
             removes the failed build). Check the suite and package names and that the mirror \
             is reachable",
            tree.display()
        ),
    )?;
    trim(&tree)?;
    let source = Source::Debootstrap {
        suite: spec.suite.clone(),
        mirror: spec.mirror.clone(),
        packages: spec.packages.clone(),
    };
    rootfs::finish(staging, &spec.name, source, &spec.agent, spec.size_mib)
}

/// Empties the [`TRIM`] directories (keeping the directories themselves, which dpkg and
/// apt expect to exist).
fn trim(tree: &Path) -> Result<(), ImageError> {
    for dir in TRIM {
        let dir = tree.join(dir);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(ImageError::io("cannot trim", &path))?;
        }
    }
    // apt's own cache directory must exist for apt to start.
    let partial = tree.join("var/cache/apt/archives/partial");
    std::fs::create_dir_all(&partial).map_err(ImageError::io("cannot create", &partial))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trim_empties_but_keeps_the_directories() {
        let tree = crate::test_util::scratch("trim");
        std::fs::create_dir_all(tree.join("usr/share/doc/git")).unwrap();
        std::fs::write(tree.join("usr/share/doc/git/copyright"), "x").unwrap();
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/keep"), "x").unwrap();
        trim(&tree).unwrap();
        assert!(tree.join("usr/share/doc").is_dir());
        assert!(!tree.join("usr/share/doc/git").exists());
        assert!(tree.join("etc/keep").is_file());
        assert!(tree.join("var/cache/apt/archives/partial").is_dir());
        std::fs::remove_dir_all(tree).unwrap();
    }
}
