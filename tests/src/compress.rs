//! Compressing initramfs images the way distributions do, with the host's `gzip`, `zstd`
//! and `xz` (Debian's gzip, zstd and xz-utils, which `cargo xtask setup` installs).

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::tmp::TempDir;

/// A compressor the Linux kernel can unpack an initramfs from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compressor {
    Gzip,
    Zstd,
    Xz,
}

impl Compressor {
    pub const ALL: [Compressor; 3] = [Compressor::Gzip, Compressor::Zstd, Compressor::Xz];

    /// The tool's name, which is also how the test names the format.
    pub fn name(self) -> &'static str {
        match self {
            Compressor::Gzip => "gzip",
            Compressor::Zstd => "zstd",
            Compressor::Xz => "xz",
        }
    }

    /// The arguments that write `file` compressed to stdout. xz must use CRC32 checks: the
    /// kernel's xz decoder knows no other (initramfs-tools and dracut pass the same).
    fn args(self) -> &'static [&'static str] {
        match self {
            Compressor::Gzip => &["-9", "-n", "-c"],
            Compressor::Zstd => &["-q", "-19", "-c"],
            Compressor::Xz => &["--check=crc32", "--lzma2=dict=1MiB", "-c"],
        }
    }

    /// `data` compressed.
    pub fn compress(self, data: &[u8]) -> Result<Vec<u8>> {
        let dir = TempDir::new("compress")?;
        let input = dir.path().join("data");
        std::fs::write(&input, data).with_context(|| format!("writing {}", input.display()))?;
        let out = Command::new(self.name())
            .args(self.args())
            .arg(&input)
            .output()
            .with_context(|| {
                format!(
                    "running {}; install it (cargo xtask setup does)",
                    self.name()
                )
            })?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!(
                "{} failed ({}): {}",
                self.name(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out.stdout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_format_has_its_magic() {
        let data = b"070701 a cpio archive, or near enough ".repeat(100);
        for (c, magic) in [
            (Compressor::Gzip, &[0x1f, 0x8b][..]),
            (Compressor::Zstd, &[0x28, 0xb5, 0x2f, 0xfd][..]),
            (Compressor::Xz, &[0xfd, b'7', b'z', b'X', b'Z', 0][..]),
        ] {
            let packed = c.compress(&data).unwrap();
            assert!(
                packed.starts_with(magic),
                "{}: {:x?}",
                c.name(),
                &packed[..8]
            );
            assert!(packed.len() < data.len(), "{}", c.name());
        }
    }
}
