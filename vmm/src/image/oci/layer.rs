//! Applying one image layer (a tar stream, plain, gzip or zstd) onto the tree below it, the
//! way the OCI image spec says: entries replace what lower layers had at their path,
//! `.wh.NAME` deletes NAME, and `.wh..wh..opq` in a directory hides everything lower
//! layers put there. Owners, modes, xattrs, device nodes and hard links are kept.
//!
//! A layer comes from a registry and is not trusted: an entry that would land outside the
//! tree — an absolute path, a `..` component, or a path that passes through a symlink
//! (which may point anywhere, e.g. `a -> /etc` then `a/passwd`) — refuses the whole layer.
//! Refusing any symlink on the way is stricter than resolving it inside the tree, and
//! costs nothing with real images: their layers record files at their real paths.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("entry {entry:?} {why}: refused, a layer must not write outside the image's root")]
    Escape { entry: String, why: String },
    #[error("it is truncated or corrupt ({0})")]
    Corrupt(String),
    #[error("cannot {what} {path}: {cause}")]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LayerError {
    let path = path.to_owned();
    move |cause| LayerError::Io { what, path, cause }
}

/// The opaque-directory marker's name.
const OPAQUE: &[u8] = b".wh..wh..opq";
/// The prefix of a whiteout's name.
const WHITEOUT: &[u8] = b".wh.";

/// The layer `blob` (compression recognized by its first bytes) applied onto `tree`.
pub fn apply(tree: &Path, blob: &Path) -> Result<(), LayerError> {
    let file = std::fs::File::open(blob).map_err(io("open", blob))?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let head = reader.fill_buf().map_err(io("read", blob))?;
    let stream: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(reader))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(
            ruzstd::decoding::StreamingDecoder::new(reader)
                .map_err(|e| LayerError::Corrupt(e.to_string()))?,
        )
    } else {
        Box::new(reader)
    };
    let mut archive = tar::Archive::new(stream);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_unpack_xattrs(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    // Paths this layer has written: an opaque marker hides only what lower layers made.
    let mut written: HashSet<PathBuf> = HashSet::new();
    let corrupt = |e: std::io::Error| LayerError::Corrupt(e.to_string());
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue; // metadata the tar reader has applied; no file
        }
        let raw = entry.path_bytes().into_owned();
        let Some(rel) = relative(&raw)? else {
            continue; // the layer's root itself
        };
        let parent = rel.parent().unwrap_or(Path::new(""));
        real_dirs(tree, parent, &raw)?;
        let name = rel.file_name().map(OsStr::as_bytes).unwrap_or_default();
        if name == OPAQUE {
            hide_lower(&tree.join(parent), parent, &written)?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            // `.wh..wh.*` other than the opaque marker are AUFS bookkeeping: no files.
            if !hidden.starts_with(WHITEOUT) {
                remove(&tree.join(parent).join(OsStr::from_bytes(hidden)))?;
            }
            continue;
        }
        let dst = tree.join(&rel);
        let existing = dst.symlink_metadata().ok();
        if kind.is_dir() {
            // A directory merges with a lower one; anything else at its path goes.
            if existing.is_some_and(|m| !m.is_dir()) {
                remove(&dst)?;
            }
        } else if existing.is_some() {
            // Never write through what is there: it may be a symlink, or a hard link
            // shared with another path.
            remove(&dst)?;
        }
        if kind.is_hard_link() {
            let link = entry.link_name_bytes().map(|l| l.into_owned());
            let target = link.as_deref().and_then(|l| relative(l).transpose());
            let Some(target) = target.transpose()? else {
                return Err(escape(&raw, "is a hard link without a target"));
            };
            real_dirs(tree, target.parent().unwrap_or(Path::new("")), &raw)?;
            let src = tree.join(&target);
            match src.symlink_metadata() {
                Ok(m) if !m.is_dir() => {}
                _ => return Err(escape(&raw, "is a hard link to no file of the image")),
            }
            std::fs::hard_link(&src, &dst).map_err(io("link", &dst))?;
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            // The tar reader would make these empty files.
            special(&dst, entry.header())?;
        } else {
            entry.unpack(&dst).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    LayerError::Corrupt(e.to_string())
                } else {
                    LayerError::Io {
                        what: "extract",
                        path: dst.clone(),
                        cause: e,
                    }
                }
            })?;
        }
        written.insert(rel);
    }
    // Read the compressed stream to its end, so that a damaged trailer (gzip's CRC) or
    // bytes cut off after the tar's end still fail the layer.
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink()).map_err(corrupt)?;
    Ok(())
}

/// A device node or FIFO at `dst`, with the entry's mode, numbers and owner.
fn special(dst: &Path, header: &tar::Header) -> Result<(), LayerError> {
    let field = |v: std::io::Result<Option<u32>>| v.ok().flatten().unwrap_or(0);
    let bad = |e: std::io::Error| LayerError::Corrupt(e.to_string());
    let kind = header.entry_type();
    let file_type = if kind.is_character_special() {
        libc::S_IFCHR
    } else if kind.is_block_special() {
        libc::S_IFBLK
    } else {
        libc::S_IFIFO
    };
    let perms = header.mode().map_err(bad)? & 0o7777;
    let dev = libc::makedev(field(header.device_major()), field(header.device_minor()));
    let (uid, gid) = (header.uid().map_err(bad)?, header.gid().map_err(bad)?);
    let path = std::ffi::CString::new(dst.as_os_str().as_bytes())
        .map_err(|e| LayerError::Corrupt(e.to_string()))?;
    // SAFETY: mknod only reads the NUL-terminated path, alive across the call.
    if unsafe { libc::mknod(path.as_ptr(), file_type | perms, dev) } != 0 {
        return Err(io("make the device node", dst)(
            std::io::Error::last_os_error(),
        ));
    }
    let (uid, gid) = (
        u32::try_from(uid).unwrap_or(u32::MAX),
        u32::try_from(gid).unwrap_or(u32::MAX),
    );
    std::os::unix::fs::lchown(dst, Some(uid), Some(gid)).map_err(io("set the owner of", dst))?;
    // mknod's mode went through the umask, and chown clears set-id bits: set it last.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(perms))
        .map_err(io("set the mode of", dst))
}

fn escape(raw: &[u8], why: &str) -> LayerError {
    LayerError::Escape {
        entry: String::from_utf8_lossy(raw).into_owned(),
        why: why.to_string(),
    }
}

/// An entry's path made relative to the tree (`./a/b` → `a/b`); `None` for the root.
/// Absolute paths and `..` are refused.
fn relative(raw: &[u8]) -> Result<Option<PathBuf>, LayerError> {
    let mut rel = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(escape(raw, "is an absolute path"))
            }
            Component::ParentDir => return Err(escape(raw, "climbs out with `..`")),
        }
    }
    Ok((!rel.as_os_str().is_empty()).then_some(rel))
}

/// Makes every directory of `dir` (relative to `tree`) a real directory: a symlink on the
/// way refuses the entry `raw`; a missing one is made; a file in the way is replaced.
fn real_dirs(tree: &Path, dir: &Path, raw: &[u8]) -> Result<(), LayerError> {
    let mut path = tree.to_owned();
    for part in dir.components() {
        path.push(part);
        match path.symlink_metadata() {
            Ok(m) if m.file_type().is_symlink() => {
                let at = path.strip_prefix(tree).unwrap_or(&path).display();
                return Err(escape(raw, &format!("goes through the symlink {at:?}")));
            }
            Ok(m) if m.is_dir() => continue,
            Ok(_) => remove(&path)?,
            Err(_) => {}
        }
        std::fs::create_dir(&path).map_err(io("create", &path))?;
    }
    Ok(())
}

/// Removes whatever is at `path` (a directory with its contents); nothing there is fine.
fn remove(path: &Path) -> Result<(), LayerError> {
    let removed = match path.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => return Ok(()),
    };
    removed.map_err(io("remove", path))
}

/// An opaque directory: removes what is below `dir` (at `rel` in the tree) unless this
/// layer wrote it.
fn hide_lower(dir: &Path, rel: &Path, written: &HashSet<PathBuf>) -> Result<(), LayerError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry.map_err(io("list", dir))?;
        let child = rel.join(entry.file_name());
        let path = entry.path();
        if !written.contains(&child) {
            remove(&path)?;
        } else if entry.file_type().is_ok_and(|t| t.is_dir()) {
            hide_lower(&path, &child, written)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_made_relative_or_refused() {
        let ok = |p: &str| relative(p.as_bytes()).unwrap();
        assert_eq!(ok("./a/b"), Some(PathBuf::from("a/b")));
        assert_eq!(ok("a//b/"), Some(PathBuf::from("a/b")));
        assert_eq!(ok("./"), None);
        for bad in ["/etc/passwd", "../x", "a/../../x", "a/.."] {
            assert!(relative(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
