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
    let tmp = TempDir::new("ext4")?;
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root)?;
    write_files(&root, files)?;
    image_of_dir(size_mib, &root)
}

/// A root filesystem image that boots with kiln's defaults for a root disk: the static
/// guest agent at `/sbin/kiln-agent` (the init kiln names), busybox with its applets in
/// `/bin`, the directories the agent mounts on, and `files`.
pub fn agent_root_image(size_mib: u64, files: &[(&str, &[u8])]) -> Result<Vec<u8>> {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let tmp = TempDir::new("ext4-root")?;
    let root = tmp.path().join("root");
    for dir in [
        "proc", "sys", "dev", "tmp", "run", "etc", "root", "bin", "sbin", "mnt",
    ] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    let bb = crate::busybox::busybox()?;
    std::fs::write(root.join("bin/busybox"), &bb.binary)?;
    for applet in &bb.applets {
        symlink("busybox", root.join("bin").join(applet))?;
    }
    let agent = crate::artifacts::static_binaries()?.kiln_agent;
    std::fs::copy(&agent, root.join("sbin/kiln-agent"))
        .with_context(|| format!("copying {}", agent.display()))?;
    symlink("/sbin/kiln-agent", root.join("bin/kiln-snapshot"))?;
    for exe in ["bin/busybox", "sbin/kiln-agent"] {
        std::fs::set_permissions(root.join(exe), std::fs::Permissions::from_mode(0o755))?;
    }
    write_files(&root, files)?;
    image_of_dir(size_mib, &root)
}

fn write_files(root: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    for (name, data) in files {
        let path = root.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `mkfs.ext4 -d root` into a new image of `size_mib` MiB.
fn image_of_dir(size_mib: u64, root: &Path) -> Result<Vec<u8>> {
    let mkfs = if Path::new(MKFS).exists() {
        MKFS
    } else {
        "mkfs.ext4"
    };
    let tmp = TempDir::new("ext4-img")?;
    let img = tmp.path().join("fs.img");
    let out = Command::new(mkfs)
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(root)
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
