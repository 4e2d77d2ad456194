//! The steps every image shares once its file tree exists: install the guest agent as the
//! init kiln boots, size the filesystem, pack the tree with `mkfs.ext4 -d`, and commit the
//! image with its metadata.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::store::Staging;
use super::{find_tool, run_tool, sha256_file, ImageError, ImageMeta, Source, META_VERSION};
use crate::disk::ROOT_INIT;

/// The variable naming the static agent when `--agent` does not.
pub const AGENT_ENV: &str = "KILN_AGENT";
/// Directories the agent mounts on or writes to as PID 1; a tarball may lack some.
const AGENT_DIRS: &[&str] = &["proc", "sys", "dev", "tmp", "run", "root", "sbin", "bin"];
const MIB: u64 = 1 << 20;

/// The static agent to install: `flag`, else `$KILN_AGENT`, else `kiln-agent` beside the
/// running `kiln`. It must be a static ELF: an image (a busybox one, say) may have no
/// C library for it, and the agent runs before anything could provide one.
pub fn locate_agent(flag: Option<&Path>) -> Result<PathBuf, ImageError> {
    let path = flag
        .map(Path::to_owned)
        .or_else(|| std::env::var_os(AGENT_ENV).map(PathBuf::from))
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.join("kiln-agent"))
        })
        .unwrap_or_else(|| PathBuf::from("kiln-agent"));
    let bad = |reason: String| ImageError::BadAgent {
        path: path.clone(),
        reason,
    };
    let elf = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
    if kiln_agent::binary::is_static_elf(&elf) {
        Ok(path)
    } else {
        Err(bad(
            "not a static x86-64 ELF executable (a dynamically linked one needs a C library \
             the image may not have)"
                .into(),
        ))
    }
}

/// Puts the agent at [`ROOT_INIT`] (replacing whatever is there) with `kiln-snapshot`
/// beside it in `/bin` (the agent answers to that name too), and makes the directories it
/// needs. Returns the agent's SHA-256.
pub fn install_agent(tree: &Path, agent: &Path) -> Result<String, ImageError> {
    for dir in AGENT_DIRS {
        let path = tree.join(dir);
        // A usrmerged tree has /bin and /sbin as symlinks to usr/: those are fine.
        if path.symlink_metadata().is_err() {
            std::fs::create_dir_all(&path).map_err(ImageError::io("cannot create", &path))?;
        }
    }
    let init = resolve_in(tree, "sbin").join("kiln-agent");
    let _ = std::fs::remove_file(&init);
    std::fs::copy(agent, &init).map_err(ImageError::io("cannot install the agent as", &init))?;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))
        .map_err(ImageError::io("cannot set the mode of", &init))?;
    let snapshot = resolve_in(tree, "bin").join("kiln-snapshot");
    let _ = std::fs::remove_file(&snapshot);
    std::os::unix::fs::symlink(ROOT_INIT, &snapshot)
        .map_err(ImageError::io("cannot create", &snapshot))?;
    let sh = resolve_in(tree, "bin").join("sh");
    if sh.symlink_metadata().is_err() {
        tracing::warn!(
            "the image has no /bin/sh: `kiln job --script` needs one (`kiln job -- CMD` runs \
             CMD without a shell)"
        );
    }
    sha256_file(agent)
}

/// The host path of the top-level directory `dir` of `tree`, following it if it is a
/// symlink the way the guest will: an absolute target (`/bin -> /usr/bin`, as some
/// container images have) is taken inside the tree, never on the host.
fn resolve_in(tree: &Path, dir: &str) -> PathBuf {
    match std::fs::read_link(tree.join(dir)) {
        Ok(target) => tree.join(target.strip_prefix("/").unwrap_or(&target)),
        Err(_) => tree.join(dir),
    }
}

/// What the tree holds: bytes in 4 KiB blocks, and inodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TreeSize {
    pub bytes: u64,
    pub blocks_bytes: u64,
    pub inodes: u64,
}

/// Walks `tree` without following symlinks and adds up its files (hard links once).
pub fn tree_size(tree: &Path) -> Result<TreeSize, ImageError> {
    let mut size = TreeSize::default();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![tree.to_owned()];
    while let Some(path) = stack.pop() {
        let meta = path
            .symlink_metadata()
            .map_err(ImageError::io("cannot read", &path))?;
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        size.inodes += 1;
        size.bytes += meta.len();
        size.blocks_bytes += meta.len().div_ceil(4096) * 4096;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(ImageError::io("cannot list", &path))? {
                stack.push(entry.map_err(ImageError::io("cannot list", &path))?.path());
            }
        }
    }
    Ok(size)
}

/// The filesystem size (MiB) that holds `size` with room to spare: its blocks and inode
/// tables, 15 % for metadata and directories, and 32 MiB for the journal and the job's own
/// files (each job writes to its overlay, which is as large as the image).
pub fn auto_size_mib(size: TreeSize) -> u64 {
    let need = size.blocks_bytes + size.inodes * 256;
    (need + need / 100 * 15).div_ceil(MIB) + 32
}

/// `mkfs.ext4`, looked up before a build starts so that a machine without it fails at
/// once rather than after the download.
pub fn mkfs() -> Result<PathBuf, ImageError> {
    find_tool("mkfs.ext4", "e2fsprogs")
}

/// Packs `tree` into a new ext4 file `out` of `size_mib` MiB (with room for the tree's
/// inodes: mkfs's default of one per 16 KiB runs out on a tree of small files).
pub fn pack(tree: &Path, out: &Path, size_mib: u64, size: TreeSize) -> Result<(), ImageError> {
    let mkfs = mkfs()?;
    let inodes = size.inodes + size.inodes / 5 + 4096;
    let mut cmd = Command::new(&mkfs);
    cmd.args(["-q", "-F", "-m", "0", "-E", "root_owner=0:0"])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-d")
        .arg(tree)
        .arg(out)
        .arg(format!("{size_mib}M"));
    run_tool(
        cmd,
        format!("mkfs.ext4 -d {} ({size_mib} MiB)", tree.display()),
        &format!(
            "; the tree holds {} MiB in {} inodes: if the filesystem is full, give a larger --size",
            size.bytes.div_ceil(MIB),
            size.inodes
        ),
    )
}

/// The end of every build: agent in, tree packed, metadata written, image committed.
pub fn finish(
    staging: Staging,
    name: &str,
    source: Source,
    agent: &Path,
    size_mib: Option<u64>,
) -> Result<(PathBuf, ImageMeta), ImageError> {
    let tree = staging.tree();
    let agent_sha256 = install_agent(&tree, agent)?;
    super::interrupt::check()?;
    let size = tree_size(&tree)?;
    let size_mib = size_mib.unwrap_or_else(|| auto_size_mib(size));
    let ext4 = staging.ext4();
    pack(&tree, &ext4, size_mib, size)?;
    let sha256 = sha256_file(&ext4)?;
    super::interrupt::check()?;
    let meta = ImageMeta {
        version: META_VERSION,
        name: name.to_string(),
        source,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        size_bytes: std::fs::metadata(&ext4)
            .map_err(ImageError::io("cannot read", &ext4))?
            .len(),
        content_bytes: size.bytes,
        sha256,
        agent_sha256,
    };
    let dir = staging.commit(&meta)?;
    Ok((dir, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_goes_into_the_tree_through_absolute_symlinks() {
        let tree = crate::test_util::scratch("agent-tree");
        std::fs::create_dir_all(tree.join("usr/sbin")).unwrap();
        std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
        // As some container images have them: absolute, meaning the guest's /usr.
        std::os::unix::fs::symlink("/usr/sbin", tree.join("sbin")).unwrap();
        std::os::unix::fs::symlink("/usr/bin", tree.join("bin")).unwrap();
        let agent = tree.join("agent");
        std::fs::write(&agent, b"agent-bytes").unwrap();
        let sha = install_agent(&tree, &agent).unwrap();
        assert_eq!(sha.len(), 64);
        assert_eq!(
            std::fs::read(tree.join("usr/sbin/kiln-agent")).unwrap(),
            b"agent-bytes"
        );
        assert_eq!(
            std::fs::read_link(tree.join("usr/bin/kiln-snapshot")).unwrap(),
            Path::new(ROOT_INIT)
        );
        for dir in ["proc", "sys", "dev", "tmp", "run"] {
            assert!(tree.join(dir).is_dir(), "{dir}");
        }
        std::fs::remove_dir_all(tree).unwrap();
    }

    #[test]
    fn auto_size_leaves_room() {
        let size = TreeSize {
            bytes: 100 * MIB,
            blocks_bytes: 110 * MIB,
            inodes: 10_000,
        };
        let mib = auto_size_mib(size);
        assert!((110 + 32..200).contains(&mib), "{mib}");
    }

    #[test]
    fn tree_size_counts_files_and_directories() {
        let dir = crate::test_util::scratch("tree");
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("a/f"), vec![1u8; 5000]).unwrap();
        std::fs::hard_link(dir.join("a/f"), dir.join("a/b/g")).unwrap();
        std::os::unix::fs::symlink("/nowhere", dir.join("l")).unwrap();
        let size = tree_size(&dir).unwrap();
        assert_eq!(size.inodes, 5, "{size:?}"); // dir, a, a/b, one of the links, l
        assert!(size.blocks_bytes >= 8192, "{size:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
