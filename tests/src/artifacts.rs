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

/// True if `elf` is a 64-bit ELF executable without a program interpreter (`PT_INTERP`),
/// i.e. it runs in an image that has no dynamic loader.
pub fn is_static_elf(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o| field::<2>(elf, o).map(u16::from_le_bytes);
    let u32_at = |o| field::<4>(elf, o).map(u32::from_le_bytes);
    let u64_at = |o| field::<8>(elf, o).map(u64::from_le_bytes);
    // 64-bit, little-endian, x86-64.
    if !elf.starts_with(b"\x7fELF\x02\x01") || u16_at(0x12) != Some(62) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = phoff.checked_add(i * usize::from(phentsize));
        matches!(at.and_then(u32_at), Some(t) if t != PT_INTERP)
    })
}

fn field<const N: usize>(bytes: &[u8], offset: usize) -> Option<[u8; N]> {
    bytes.get(offset..offset.checked_add(N)?)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed");
        assert!(is_static_elf(&busybox), "Debian's busybox-static is static");
        let sh = std::fs::read("/bin/sh").unwrap();
        assert!(!is_static_elf(&sh), "/bin/sh is dynamically linked");
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        assert!(!is_static_elf(b"\x7fELF\x02\x01"));
    }

    #[test]
    fn a_dir_without_static_binaries_is_refused() {
        let err = in_dir(Path::new("/nonexistent")).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/kiln"), "{err:#}");
    }
}
