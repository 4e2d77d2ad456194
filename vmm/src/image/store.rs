//! The local image store: a directory holding one directory per image, `<store>/<name>/`
//! with [`ROOTFS_FILE`] and [`META_FILE`].
//!
//! A new image is made in a hidden staging directory of the store (same filesystem) and
//! renamed into place only when it is complete, so a failed or interrupted build never
//! leaves a half-made image under a name, and readers see either the old image or the new.

use std::path::{Path, PathBuf};

use super::cleanup::{process_alive, remove_tree};
use super::{check_name, ImageError, ImageMeta, META_FILE, ROOTFS_FILE};

/// The store used when neither `--store` nor `$KILN_IMAGE_STORE` names one.
pub const DEFAULT_STORE: &str = "/var/lib/kiln/images";
/// The variable that overrides [`DEFAULT_STORE`].
pub const STORE_ENV: &str = "KILN_IMAGE_STORE";
/// Staging directories start with this (hidden, so listings skip them).
const STAGING_PREFIX: &str = ".staging-";

/// An image store directory (it need not exist until something is stored).
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// One image as `kiln image ls` lists it; `meta` is `None` when its metadata is unreadable.
#[derive(Debug)]
pub struct Listed {
    pub name: String,
    pub meta: Option<ImageMeta>,
}

impl Store {
    /// `flag` if given, else `$KILN_IMAGE_STORE`, else [`DEFAULT_STORE`].
    pub fn locate(flag: Option<&Path>) -> Store {
        let dir = flag
            .map(Path::to_owned)
            .or_else(|| std::env::var_os(STORE_ENV).map(PathBuf::from))
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE));
        // Absolute, so that the paths it hands out (to `ls --json`, to a VM's disk) mean
        // the same from any working directory.
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        Store { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The images in the store, sorted by name.
    pub fn list(&self) -> Vec<Listed> {
        let mut images: Vec<Listed> = self
            .names()
            .into_iter()
            .map(|name| Listed {
                meta: self.meta(&name).ok(),
                name,
            })
            .collect();
        images.sort_by(|a, b| a.name.cmp(&b.name));
        images
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join(ROOTFS_FILE).is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| check_name(n).is_ok())
            .collect();
        names.sort();
        names
    }

    fn not_found(&self, name: &str) -> ImageError {
        let names = self.names();
        ImageError::NotFound {
            name: name.to_string(),
            store: self.dir.clone(),
            available: if names.is_empty() {
                "(none)".to_string()
            } else {
                names.join(", ")
            },
        }
    }

    /// The directory of the existing image `name`.
    fn image_dir(&self, name: &str) -> Result<PathBuf, ImageError> {
        check_name(name)?;
        let dir = self.dir.join(name);
        if dir.join(ROOTFS_FILE).is_file() {
            Ok(dir)
        } else {
            Err(self.not_found(name))
        }
    }

    /// The ext4 file of image `name`, checked to be ext4: what `--image NAME` boots.
    pub fn rootfs(&self, name: &str) -> Result<PathBuf, ImageError> {
        let path = self.image_dir(name)?.join(ROOTFS_FILE);
        let file = std::fs::File::open(&path).map_err(ImageError::io("cannot open", &path))?;
        if !crate::disk::is_ext4(&file) {
            return Err(ImageError::NotExt4 {
                name: name.to_string(),
                path,
            });
        }
        Ok(path)
    }

    /// Image `name`'s metadata, once its ext4 file is checked to still have the SHA-256 the
    /// metadata records (reads the whole file).
    pub fn verify(&self, name: &str) -> Result<ImageMeta, ImageError> {
        let meta = self.meta(name)?;
        let path = self.rootfs(name)?;
        let actual = super::sha256_file(&path)?;
        if actual != meta.sha256 {
            return Err(ImageError::Modified {
                name: name.to_string(),
                path,
                recorded: meta.sha256,
                actual,
            });
        }
        Ok(meta)
    }

    /// The metadata of image `name`.
    pub fn meta(&self, name: &str) -> Result<ImageMeta, ImageError> {
        let path = self.image_dir(name)?.join(META_FILE);
        let bad = |reason: String| ImageError::BadMeta {
            name: name.to_string(),
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
    }

    /// Removes image `name`: first renamed out of the way (so it is gone from the store at
    /// once), then deleted.
    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        let dir = self.image_dir(name)?;
        let doomed = self.hidden_path(".removing-", name);
        std::fs::rename(&dir, &doomed).map_err(ImageError::io("cannot remove", &dir))?;
        std::fs::remove_dir_all(&doomed).map_err(ImageError::io("cannot remove", &doomed))
    }

    /// Starts making image `name`: refuses an existing name unless `force`, and gives a
    /// fresh staging directory that is removed unless [`Staging::commit`] is reached.
    pub fn stage(&self, name: &str, force: bool) -> Result<Staging, ImageError> {
        check_name(name)?;
        if !force && self.dir.join(name).exists() {
            return Err(self.exists(name));
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(ImageError::io("cannot create the image store", &self.dir))?;
        self.remove_stale();
        let dir = self.hidden_path(STAGING_PREFIX, name);
        if dir.exists() {
            remove_tree(&dir)?;
        }
        std::fs::create_dir(&dir).map_err(ImageError::io("cannot create", &dir))?;
        Ok(Staging {
            store: self.clone(),
            name: name.to_string(),
            dir,
            force,
            committed: false,
        })
    }

    /// Removes what builds and removals killed half-way left behind: hidden staging,
    /// replaced and removing directories whose process (the pid ending their name) is gone.
    fn remove_stale(&self) {
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = [STAGING_PREFIX, ".replaced-", ".removing-"]
                .iter()
                .any(|p| name.starts_with(p));
            let pid = name.rsplit('-').next().and_then(|p| p.parse::<i32>().ok());
            if let (true, Some(pid)) = (ours, pid) {
                if !process_alive(pid) {
                    if let Err(e) = remove_tree(&entry.path()) {
                        tracing::warn!("cannot remove the stale {name}: {e}");
                    }
                }
            }
        }
    }

    /// A new hidden path `<prefix><name>-<n>-<pid>` in the store, unique within this
    /// process too (tests build concurrently); the pid comes last for `remove_stale`.
    fn hidden_path(&self, prefix: &str, name: &str) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dir
            .join(format!("{prefix}{name}-{n}-{}", std::process::id()))
    }

    fn exists(&self, name: &str) -> ImageError {
        ImageError::Exists {
            name: name.to_string(),
            store: self.dir.clone(),
        }
    }
}

/// An image being made. Dropped without [`Staging::commit`], it removes everything it
/// holds.
#[derive(Debug)]
pub struct Staging {
    store: Store,
    name: String,
    dir: PathBuf,
    force: bool,
    committed: bool,
}

impl Staging {
    /// The staging directory itself (where a pull keeps its layers until applied).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the builder puts the image's file tree.
    pub fn tree(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// Where the ext4 file goes.
    pub fn ext4(&self) -> PathBuf {
        self.dir.join(ROOTFS_FILE)
    }

    /// Writes the metadata, drops the file tree and renames the image into place
    /// (replacing an image of the same name only if `force` was given).
    pub fn commit(mut self, meta: &ImageMeta) -> Result<PathBuf, ImageError> {
        let tree = self.tree();
        if tree.exists() {
            remove_tree(&tree)?;
        }
        let meta_path = self.dir.join(META_FILE);
        let json = serde_json::to_vec_pretty(meta).unwrap_or_default();
        std::fs::write(&meta_path, json).map_err(ImageError::io("cannot write", &meta_path))?;
        let target = self.store.dir.join(&self.name);
        let old = self.store.hidden_path(".replaced-", &self.name);
        let replacing = target.exists();
        if replacing {
            if !self.force {
                return Err(self.store.exists(&self.name));
            }
            std::fs::rename(&target, &old).map_err(ImageError::io("cannot replace", &target))?;
        }
        std::fs::rename(&self.dir, &target)
            .map_err(ImageError::io("cannot rename into", &target))?;
        self.committed = true;
        if replacing {
            remove_tree(&old)?;
        }
        Ok(target)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = remove_tree(&self.dir) {
                tracing::warn!(
                    "cannot remove the failed build's {}: {e}",
                    self.dir.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Source;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn meta(name: &str) -> ImageMeta {
        ImageMeta {
            version: crate::image::META_VERSION,
            name: name.into(),
            source: Source::Import {
                tarball: "/t.tar".into(),
                sha256: "00".into(),
            },
            created_unix: 0,
            size_bytes: 4096,
            content_bytes: 0,
            sha256: "00".into(),
            agent_sha256: "00".into(),
        }
    }

    fn make(store: &Store, name: &str, force: bool, magic: bool) -> Result<PathBuf, ImageError> {
        let staging = store.stage(name, force)?;
        std::fs::create_dir_all(staging.tree().join("etc")).unwrap();
        let mut fs = vec![0u8; 4096];
        if magic {
            fs[1080..1082].copy_from_slice(&[0x53, 0xef]);
        }
        std::fs::write(staging.ext4(), fs).unwrap();
        staging.commit(&meta(name))
    }

    #[test]
    fn images_are_staged_committed_listed_and_removed() {
        let dir = scratch("cycle");
        let store = Store::locate(Some(&dir));
        let staging = store.stage("half", false).unwrap();
        std::fs::write(staging.ext4(), b"x").unwrap();
        drop(staging);
        assert!(store.list().is_empty(), "a dropped staging left an image");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

        let path = make(&store, "deb", false, true).unwrap();
        assert!(!path.join("rootfs").exists(), "the tree must not be kept");
        assert!(store.rootfs("deb").unwrap().ends_with("deb/rootfs.ext4"));
        assert_eq!(store.meta("deb").unwrap(), meta("deb"));
        let e = make(&store, "deb", false, true).unwrap_err().to_string();
        assert!(e.contains("already exists") && e.contains("--force"), "{e}");
        make(&store, "deb", true, true).unwrap();
        make(&store, "bad", false, false).unwrap();
        let e = store.rootfs("bad").unwrap_err().to_string();
        assert!(e.contains("not an ext4"), "{e}");
        let names: Vec<_> = store.list().into_iter().map(|l| l.name).collect();
        assert_eq!(names, ["bad", "deb"]);
        let e = store.rootfs("nope").unwrap_err().to_string();
        assert!(
            e.contains("no image \"nope\"") && e.contains("bad, deb"),
            "{e}"
        );
        store.remove("deb").unwrap();
        assert!(store.remove("deb").is_err());
        let names: Vec<_> = store.list().into_iter().map(|l| l.name).collect();
        assert_eq!(names, ["bad"]);
        assert!(store.rootfs("../etc").is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn what_a_killed_build_left_is_removed_by_the_next() {
        let dir = scratch("stale");
        let store = Store::locate(Some(&dir));
        // No process has pid i32::MAX; this process is alive.
        let dead = dir.join(format!(".staging-x-{}", i32::MAX));
        let live = dir.join(format!(".staging-y-{}", std::process::id()));
        for d in [&dead, &live] {
            std::fs::create_dir_all(d.join("rootfs/etc")).unwrap();
        }
        make(&store, "z", false, true).unwrap();
        assert!(
            !dead.exists(),
            "the dead build's staging directory was kept"
        );
        assert!(
            live.exists(),
            "a live build's staging directory was removed"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_empty_or_missing_store_lists_none() {
        let store = Store::locate(Some(&scratch("missing")));
        assert!(store.list().is_empty());
        let e = store.rootfs("x").unwrap_err().to_string();
        assert!(e.contains("(none)"), "{e}");
    }
}
