//! Small ext4 images for disk tests, built on the host with e2fsprogs' `mkfs.ext4 -d`.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::tmp::TempDir;

/// Where Debian's e2fsprogs installs `mkfs.ext4`.
const MKFS: &str = "/usr/sbin/mkfs.ext4";

/// An ext4 filesystem image of `size_mib` MiB holding `files` (relative path, contents),
/// every file mode 0644 and owned by root.
pub fn image(size_mib: u64, files: &[(&str, &[u8])]) -> Result<Vec<u8>> {
    let mkfs = if Path::new(MKFS).exists() {
        MKFS
    } else {
        "mkfs.ext4"
    };
    let tmp = TempDir::new("ext4")?;
    let root = tmp.path().join("root");
    for (name, data) in files {
        let path = root.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
    }
    std::fs::create_dir_all(&root)?;
    let img = tmp.path().join("fs.img");
    let out = Command::new(mkfs)
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&img)
        .arg(format!("{size_mib}M"))
        .output()
        .with_context(|| {
            format!("running {mkfs}: install e2fsprogs (apt-get install e2fsprogs; `cargo xtask setup` does)")
        })?;
    if !out.status.success() {
        bail!(
            "{mkfs} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::read(&img).with_context(|| format!("reading {}", img.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn image_has_the_ext4_magic_and_size() {
        let img = super::image(4, &[("hello.txt", b"hi\n")]).unwrap();
        assert_eq!(img.len(), 4 << 20);
        assert_eq!(&img[1080..1082], &[0x53, 0xef]);
    }
}
