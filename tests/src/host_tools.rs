//! Dynamically linked programs of this machine that the test-bed host's initramfs carries
//! beside busybox, each with the shared libraries (and the dynamic loader) `ldd` lists for
//! it, at the same paths as here.
//!
//! - `nft` (Debian's `nftables`): `kiln net setup --nat` installs its guest network policy
//!   with it, and the `net_` policy test checks that policy against a real guest.
//! - `ssh` (Debian's `openssh-client`): the `nesting_` tests log into the VMs the nesting
//!   server makes as GitLab Runner does, over SSH with a password.
//!
//! `cargo xtask setup` installs both. A program missing here is left out with a note on
//! stderr; the tests that need it say so when they find it missing in the test bed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cpio;

/// The programs, by name: each goes to `/bin/<name>` in the image.
pub const TOOLS: &[&str] = &["nft", "ssh"];

/// Where the programs are looked for (root's PATH on Debian, which `nft` lives in).
const SEARCH: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Adds each of [`TOOLS`] found on this machine as `/bin/<name>`, and its libraries.
pub fn add_to<W: Write>(archive: &mut cpio::Writer<W>) -> Result<()> {
    let mut added = std::collections::HashSet::new();
    for name in TOOLS {
        let Some(binary) = find(name) else {
            eprintln!(
                "kiln-tests: {name} is not installed here, so the test bed has none \
                 (cargo xtask setup installs it)"
            );
            continue;
        };
        archive.file(&format!("/bin/{name}"), 0o755, &read(&binary)?)?;
        for lib in libraries(&binary)? {
            if added.insert(lib.clone()) {
                let path = lib
                    .to_str()
                    .with_context(|| format!("{lib:?} is not UTF-8"))?;
                archive.file(path, 0o755, &read(&lib)?)?;
            }
        }
    }
    Ok(())
}

/// A program of this machine for one test's test bed only: `binary` as `<prefix><at>` and
/// the libraries `ldd` lists for it under `<prefix>` at their paths here, as `files`
/// entries; the test's script installs them with `cp -a "$FILES/<prefix>/." /`.
pub fn program_files(binary: &Path, at: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = vec![(format!("{prefix}{at}"), read(binary)?)];
    for lib in libraries(binary)? {
        let path = lib
            .to_str()
            .with_context(|| format!("{lib:?} is not UTF-8"))?;
        files.push((format!("{prefix}{path}"), read(&lib)?));
    }
    Ok(files)
}

fn find(name: &str) -> Option<PathBuf> {
    SEARCH
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The absolute paths `ldd` prints for `binary`: its libraries and the loader.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd (Debian's libc-bin)")?;
    if !out.status.success() {
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

/// `libx.so.1 => /lib/…/libx.so.1 (0x…)` and `/lib64/ld-linux-x86-64.so.2 (0x…)` lines give
/// a path; the vDSO (`linux-vdso.so.1 (0x…)`) has none.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = line.split_once("=> ").map_or(line, |(_, right)| right);
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_libraries_and_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibmnl.so.0 => /lib/x86_64-linux-gnu/libmnl.so.0 (0x00007f7d)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f7d)\n\
                    \tlibgone.so.1 => not found\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libmnl.so.0"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }
}
