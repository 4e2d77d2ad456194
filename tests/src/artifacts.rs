//! The static binaries that go into test-bed and guest images.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// The target triple the static binaries are built for.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Static (static-pie) builds of kiln's binaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticBinaries {
    /// The VMM, `kiln`.
    pub kiln: PathBuf,
    /// The guest agent, `kiln-agent`.
    pub kiln_agent: PathBuf,
    /// The GitLab Runner custom-executor driver, `kiln-gitlab`.
    pub kiln_gitlab: PathBuf,
}

/// The static binaries: those in `$KILN_STATIC_BIN_DIR` if it is set, else a static release
/// build of this checkout (made once per process; cargo makes it cheap when nothing changed).
pub fn static_binaries() -> Result<StaticBinaries> {
    if let Some(dir) = std::env::var_os("KILN_STATIC_BIN_DIR") {
        return in_dir(Path::new(&dir)).context("using $KILN_STATIC_BIN_DIR");
    }
    static BUILT: OnceLock<Result<StaticBinaries, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn in_dir(dir: &Path) -> Result<StaticBinaries> {
    let bins = StaticBinaries {
        kiln: dir.join("kiln"),
        kiln_agent: dir.join("kiln-agent"),
        kiln_gitlab: dir.join("kiln-gitlab"),
    };
    for bin in [&bins.kiln, &bins.kiln_agent, &bins.kiln_gitlab] {
        let bytes = std::fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
        if !is_static_elf(&bytes) {
            bail!(
                "{} is not a static ELF executable; build it with RUSTFLAGS='-C \
                 target-feature=+crt-static' and --target {STATIC_TARGET}",
                bin.display()
            );
        }
    }
    Ok(bins)
}

fn build() -> Result<StaticBinaries> {
    let root = crate::kernels::repo_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "--release", "--target", STATIC_TARGET])
        .args(["-p", "kiln", "-p", "kiln-agent", "-p", "kiln-gitlab"])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .status()
        .with_context(|| format!("running {}", Path::new(&cargo).display()))?;
    if !status.success() {
        bail!("the static release build of kiln, kiln-agent and kiln-gitlab failed ({status}); see cargo's output above");
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    in_dir(&target_dir.join(STATIC_TARGET).join("release"))
}

pub use kiln_agent::binary::is_static_elf;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dir_without_static_binaries_is_refused() {
        let err = in_dir(Path::new("/nonexistent")).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/kiln"), "{err:#}");
    }
}
