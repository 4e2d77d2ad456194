//! The package's file tree as it is staged for `dpkg-deb --build`: every file and directory
//! with the mode it is installed with, whatever the builder's umask.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flate2::{Compression, GzBuilder};

/// A staging directory that files are added to by their installed path.
pub struct Tree {
    root: PathBuf,
    /// Installed paths of the regular files, in the order they were added.
    files: Vec<String>,
}

impl Tree {
    /// An empty tree at `root` (whatever was there is removed).
    pub fn new(root: &Path) -> Result<Self> {
        if root.exists() {
            std::fs::remove_dir_all(root)
                .with_context(|| format!("removing the old staging tree {}", root.display()))?;
        }
        mkdir(root)?;
        Ok(Tree {
            root: root.to_path_buf(),
            files: Vec::new(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the installed path `path` of a file added earlier is staged.
    pub fn staged(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// The installed paths of the regular files added so far (`/usr/bin/kiln`, …).
    pub fn files(&self) -> &[String] {
        &self.files
    }

    /// Writes `data` at the installed path `path` (absolute) with `mode`; parent directories
    /// are made with mode 0755.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        let target = self.place(path)?;
        std::fs::write(&target, data).with_context(|| format!("writing {}", target.display()))?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", target.display()))?;
        self.files.push(path.to_string());
        Ok(())
    }

    /// Writes `data` gzip-compressed as `gzip -9n` would (best compression, no name, no
    /// time stamp) at `path`, mode 0644.
    pub fn gz_file(&mut self, path: &str, data: &[u8]) -> Result<()> {
        self.file(path, 0o644, &gzip(data)?)
    }

    /// Writes a control file (`DEBIAN/NAME`), which has no installed path.
    pub fn control(&self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        let dir = self.root.join("DEBIAN");
        mkdir(&dir)?;
        let target = dir.join(name);
        std::fs::write(&target, data).with_context(|| format!("writing {}", target.display()))?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", target.display()))
    }

    /// `Installed-Size`: KiB the files and directories take, counted as dpkg-gencontrol
    /// does (each file's size rounded up to a KiB, one KiB per directory).
    pub fn installed_size_kib(&self) -> Result<u64> {
        fn walk(dir: &Path, skip: &Path) -> Result<u64> {
            let mut kib = 1;
            for entry in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
                let entry = entry?;
                let path = entry.path();
                if path == skip {
                    continue;
                }
                let meta = entry.metadata()?;
                kib += if meta.is_dir() {
                    walk(&path, skip)?
                } else {
                    meta.len().div_ceil(1024).max(1)
                };
            }
            Ok(kib)
        }
        // The root directory itself is not installed.
        Ok(walk(&self.root, &self.root.join("DEBIAN"))? - 1)
    }

    /// The staging path of the installed path `path`, its parents made.
    fn place(&self, path: &str) -> Result<PathBuf> {
        let Some(relative) = path.strip_prefix('/') else {
            bail!("installed path {path:?} is not absolute");
        };
        if relative
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            bail!("installed path {path:?} is not a plain absolute path");
        }
        let mut dir = self.root.clone();
        let mut components: Vec<&str> = relative.split('/').collect();
        let name = components.pop().unwrap_or_default();
        for c in components {
            dir.push(c);
            if !dir.is_dir() {
                mkdir(&dir)?;
            }
        }
        Ok(dir.join(name))
    }
}

fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

/// `data` as `gzip -9n` compresses it: the header has no file name and time stamp 0, so the
/// same input always gives the same bytes.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = GzBuilder::new()
        .mtime(0)
        .operating_system(3) // Unix, as gzip writes it
        .write(Vec::new(), Compression::best());
    encoder.write_all(data)?;
    Ok(encoder.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("kiln-dist-{name}-{}", std::process::id()))
    }

    #[test]
    fn files_get_their_modes_and_are_counted() {
        let root = scratch("tree");
        let mut tree = Tree::new(&root).unwrap();
        tree.file("/usr/bin/x", 0o755, &[0; 1500]).unwrap();
        tree.file("/usr/share/doc/x/copyright", 0o644, b"c")
            .unwrap();
        tree.control("control", 0o644, b"Package: x\n").unwrap();
        let mode = |p: &str| root.join(p).metadata().unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("usr/bin/x"), 0o755);
        assert_eq!(mode("usr/share/doc/x/copyright"), 0o644);
        assert_eq!(mode("usr/share/doc"), 0o755);
        assert_eq!(tree.files(), ["/usr/bin/x", "/usr/share/doc/x/copyright"]);
        // usr, usr/bin, usr/share, usr/share/doc, usr/share/doc/x: 5; x: 2 KiB; copyright: 1.
        assert_eq!(tree.installed_size_kib().unwrap(), 8);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn paths_must_be_plain_and_absolute() {
        let root = scratch("bad");
        let mut tree = Tree::new(&root).unwrap();
        for bad in ["usr/bin/x", "/usr/../etc/x", "/usr//x", "/./x"] {
            assert!(tree.file(bad, 0o644, b"").is_err(), "{bad}");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn gzip_is_reproducible_and_marked_best() {
        let a = gzip(b"hello hello hello").unwrap();
        assert_eq!(a, gzip(b"hello hello hello").unwrap());
        // Magic, deflate, no flags (no name), mtime 0, XFL 2 (best), OS 3 (Unix).
        assert_eq!(&a[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 3]);
        let mut out = String::new();
        flate2::read::GzDecoder::new(&a[..])
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "hello hello hello");
    }
}
