//! The jail directory on the host: `<base>/<ID>/jail.pid` (the `kiln jail` process that
//! owns it) and `<base>/<ID>/root` (what the VMM sees as `/`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{JailError, JailSpec};

/// A jail directory; removed when dropped unless it is to be kept.
#[derive(Debug)]
pub struct JailDir {
    /// `<base>/<ID>`.
    pub dir: PathBuf,
    /// `<base>/<ID>/root`.
    pub root: PathBuf,
    keep: bool,
}

impl JailDir {
    /// Creates `<base>/<id>` fresh: an existing one is replaced only if the process named
    /// in its `jail.pid` is gone.
    pub fn create(base: &Path, id: &str, keep: bool) -> Result<JailDir, JailError> {
        let dir = base.join(id);
        let base_err = |source| JailError::Base {
            path: dir.clone(),
            source,
        };
        fs::create_dir_all(base).map_err(base_err)?;
        if let Err(e) = fs::create_dir(&dir) {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(base_err(e));
            }
            let pid = fs::read_to_string(dir.join("jail.pid"))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            let alive = match pid {
                Some(p) if p > 0 => {
                    // SAFETY: kill with signal 0 only checks that the process exists.
                    let r = unsafe { libc::kill(p, 0) };
                    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
                }
                _ => true, // no owner recorded: maybe being set up right now
            };
            if alive {
                return Err(JailError::Taken {
                    id: id.to_string(),
                    dir,
                    pid,
                });
            }
            tracing::warn!(
                "jail {id}: removing the stale {} (its kiln jail, pid {}, is gone)",
                dir.display(),
                pid.unwrap_or(0)
            );
            fs::remove_dir_all(&dir).map_err(base_err)?;
            fs::create_dir(&dir).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    JailError::Taken {
                        id: id.to_string(),
                        dir: dir.clone(),
                        pid: None,
                    }
                } else {
                    base_err(e)
                }
            })?;
        }
        let jail = JailDir {
            root: dir.join("root"),
            dir,
            keep,
        };
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| JailError::Io { what, path, source }
        };
        let pid_file = jail.dir.join("jail.pid");
        {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&pid_file)
        }
        .and_then(|mut f| writeln!(f, "{}", std::process::id()))
        .map_err(io("write", &pid_file))?;
        // Root's alone: the VMM never sees this path (its root is `root/` below), and the
        // sockets and console in there hold the guest's data.
        fs::set_permissions(&jail.dir, fs::Permissions::from_mode(0o700))
            .map_err(io("set the mode of", &jail.dir))?;
        Ok(jail)
    }

    /// Fills the root: the kiln binary (and, if it is dynamically linked, its libraries),
    /// each `--file`, the `dev` mount point; then hands the root to uid:gid.
    ///
    /// Everything is created as root, in directories root owns, and handed to the jail's
    /// uid only at the end, deepest first, with `lchown` (never following a symlink): at
    /// every step all the ancestors of the path being changed still belong to root, so a
    /// process of the jail's uid (a previous jail's VMM, with a shared `--uid`) can neither
    /// swap an entry for a symlink nor have root write or chown through one.
    pub fn populate(&self, spec: &JailSpec) -> Result<(), JailError> {
        let root = &self.root;
        mkdir(root)?;
        // Directories for the jail's uid, children before their parents.
        let mut handover = Vec::new();
        let mut names = std::collections::HashSet::new();
        names.insert(std::ffi::OsString::from("kiln"));
        names.insert(std::ffi::OsString::from("dev"));
        for file in &spec.files {
            let name = file.file_name().ok_or_else(|| JailError::MissingFile {
                path: file.clone(),
                source: std::io::ErrorKind::InvalidInput.into(),
            })?;
            if !names.insert(name.to_owned()) {
                return Err(JailError::DuplicateName(
                    name.to_string_lossy().into_owned(),
                ));
            }
            place(file, &root.join(name), spec, &mut handover)?;
        }
        if !spec.images.is_empty() {
            let images = root.join(super::JAIL_IMAGE_STORE.trim_start_matches('/'));
            if !names.insert(images.file_name().unwrap_or_default().to_owned()) {
                return Err(JailError::DuplicateName("images".to_string()));
            }
            mkdir(&images)?;
            for image in &spec.images {
                let name = image.file_name().unwrap_or_default();
                place(image, &images.join(name), spec, &mut handover)?;
            }
            handover.push(images);
        }
        place(&spec.kiln, &root.join("kiln"), spec, &mut Vec::new())?;
        for lib in shared_libraries(&spec.kiln) {
            let dst = root.join(lib.strip_prefix("/").unwrap_or(&lib));
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent).map_err(|source| JailError::Io {
                    what: "create",
                    path: parent.to_owned(),
                    source,
                })?;
            }
            place(&lib, &dst, spec, &mut Vec::new())?;
        }
        mkdir(&root.join("dev"))?;
        handover.push(root.clone());
        for dir in &handover {
            lchown(dir, spec.uid, spec.gid)?;
        }
        fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(|source| {
            JailError::Io {
                what: "set the mode of",
                path: root.clone(),
                source,
            }
        })
    }
}

impl Drop for JailDir {
    fn drop(&mut self) {
        if self.keep {
            tracing::info!("keeping the jail directory {}", self.dir.display());
        } else if let Err(e) = fs::remove_dir_all(&self.dir) {
            tracing::warn!(
                "cannot remove the jail directory {}: {e}",
                self.dir.display()
            );
        }
    }
}

/// A directory of mode 0700: root's while the jail is set up, the jail uid's once handed
/// over (`dev` stays root's: a mount point the jail sees only through its tmpfs).
fn mkdir(path: &Path) -> Result<(), JailError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(|source| JailError::Io {
            what: "create",
            path: path.to_owned(),
            source,
        })
}

/// `fchownat(AT_SYMLINK_NOFOLLOW)`: a symlink at `path` is changed itself, never followed.
fn lchown(path: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|source| JailError::Io {
        what: "chown",
        path: path.to_owned(),
        source,
    })
}

/// Puts `src` at `dst`: a directory recursively (added to `handover`, after its
/// subdirectories, to become the jail's uid's at the end); a file hard-linked if the jail's
/// uid can read it that way and not write it, else copied into a new file (across
/// filesystems, to keep the host's file from the jail's uid, or to be given to uid:gid
/// when it could not read it).
fn place(
    src: &Path,
    dst: &Path,
    spec: &JailSpec,
    handover: &mut Vec<PathBuf>,
) -> Result<(), JailError> {
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| JailError::Io { what, path, source }
    };
    let meta = fs::metadata(src).map_err(|source| JailError::MissingFile {
        path: src.to_owned(),
        source,
    })?;
    if meta.is_dir() {
        mkdir(dst)?;
        for entry in fs::read_dir(src).map_err(io("read", src))? {
            let entry = entry.map_err(io("read", src))?;
            place(&entry.path(), &dst.join(entry.file_name()), spec, handover)?;
        }
        handover.push(dst.to_owned());
        return Ok(());
    }
    // A hard link to a symlink would be a symlink: link what it points to.
    let src = &fs::canonicalize(src).map_err(io("resolve", src))?;
    let mode = meta.mode();
    let readable = mode & 0o004 != 0
        || (meta.gid() == spec.gid && mode & 0o040 != 0)
        || (meta.uid() == spec.uid && mode & 0o400 != 0);
    // A link shares the inode: the VMM could write the host's file through it.
    let writable = mode & 0o002 != 0
        || (meta.gid() == spec.gid && mode & 0o020 != 0)
        || (meta.uid() == spec.uid && mode & 0o200 != 0);
    if readable && !writable && fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    // The jail's own copy: its uid's, with the owner's permissions only (no one else on
    // the host reads it), and without set-id bits: a set-uid copy must not appear.
    copy_new(src, dst, mode & 0o700 | 0o400, Some((spec.uid, spec.gid)))
        .map_err(io("copy into the jail", src))
}

/// Copies `src` into a new file `dst` (`O_EXCL | O_NOFOLLOW`: never through an existing
/// name or a symlink) with permissions `mode`, owned by `owner` if given (`fchown` on the
/// open file, not on the path).
fn copy_new(src: &Path, dst: &Path, mode: u32, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut from = fs::File::open(src)?;
    let mut to = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dst)?;
    std::io::copy(&mut from, &mut to)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&to, Some(uid), Some(gid))?;
    }
    // After the chown (which would clear set-id bits; `mode` has none anyway).
    to.set_permissions(fs::Permissions::from_mode(mode))
}

/// The loader and libraries of a dynamically linked executable (as `ldd` prints them), or
/// nothing for a static one.
fn shared_libraries(exe: &Path) -> Vec<PathBuf> {
    if !has_interpreter(exe) {
        return Vec::new();
    }
    let Ok(out) = std::process::Command::new("ldd").arg(exe).output() else {
        tracing::warn!(
            "{} is dynamically linked and ldd is missing: the jail may not run it",
            exe.display()
        );
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// True if the ELF file has a `PT_INTERP` program header (a dynamic loader).
fn has_interpreter(exe: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let Ok(elf) = fs::read(exe) else { return false };
    let at = |o: usize, n: usize| elf.get(o..o + n);
    let num = |o: usize, n: usize| -> Option<usize> {
        let b = at(o, n)?;
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(b);
        usize::try_from(u64::from_le_bytes(v)).ok()
    };
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (num(0x20, 8), num(0x36, 2), num(0x38, 2))
    else {
        return false;
    };
    (0..phnum).any(|i| num(phoff + i * phentsize, 4) == Some(PT_INTERP as usize))
}

/// The flags of the inner kiln whose values are files the VMM creates, and where each
/// of them is on the host: `(flag, value, host path)`.
pub fn host_paths(args: &[String], root: &Path) -> Vec<(String, String, PathBuf)> {
    const FLAGS: [&str; 3] = ["--vsock", "--api", "--serial"];
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let pair = if let Some((flag, value)) = arg.split_once('=') {
            Some((flag.to_string(), value.to_string()))
        } else if FLAGS.contains(&arg.as_str()) {
            i += 1;
            args.get(i).map(|v| (arg.clone(), v.clone()))
        } else {
            None
        };
        if let Some((flag, value)) = pair {
            if FLAGS.contains(&flag.as_str())
                && !(flag == "--serial" && (value == "stdout" || value == "null"))
            {
                let host = root.join(value.trim_start_matches('/'));
                out.push((flag, value, host));
            }
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inner_paths_map_under_the_root() {
        let args: Vec<String> = [
            "run",
            "--kernel",
            "k",
            "--vsock",
            "v.sock",
            "--api=/a.sock",
            "--serial",
            "null",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let root = Path::new("/srv/kiln/j/root");
        let m = host_paths(&args, root);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].2, root.join("v.sock"));
        assert_eq!(m[1].0, "--api");
        assert_eq!(m[1].2, root.join("a.sock"));
    }

    #[test]
    fn copies_never_go_through_an_existing_name_or_a_symlink() {
        let dir = crate::test_util::scratch("jail-copy");
        let (src, target, link) = (dir.join("src"), dir.join("target"), dir.join("link"));
        fs::write(&src, "new").unwrap();
        fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        for dst in [&link, &target] {
            assert!(
                copy_new(&src, dst, 0o644, None).is_err(),
                "{}",
                dst.display()
            );
        }
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
        copy_new(&src, &dir.join("fresh"), 0o640, None).unwrap();
        let fresh = fs::metadata(dir.join("fresh")).unwrap();
        assert_eq!(fresh.mode() & 0o7777, 0o640);
        fs::remove_dir_all(&dir).unwrap();
    }
}
