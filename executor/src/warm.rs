//! Warm snapshots (`warm_snapshots = true`): the first job on a store image boots it, and
//! the driver snapshots the VM as soon as its agent answers (clock set, the image user's
//! directories made; nothing of the job has reached it yet); later jobs on the same image
//! start by restoring that snapshot, each clone with its own overlay, MAC, hostname,
//! entropy and clock (what `kiln restore` gives every clone).
//!
//! A warm snapshot is keyed by the SHA-256 of the image's ext4 file (which a new digest of
//! the same name changes, as does a new agent) and by what it froze of the VM: kernel,
//! memory, vCPUs, and the slot's network when there is one (the guest keeps its address).
//! They live in `<snapshot_dir>/warm/`, shared by every project: they hold the image and a
//! booted guest, never a job's data. A new one replaces the older ones of its image; the
//! rest go by `warm_snapshots_max_age_hours` (since last used) and
//! `warm_snapshots_max_mib` (the least recently used first).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::store::Image;

/// The record in each warm snapshot's directory; its modification time is the last use.
const RECORD: &str = "warm.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    image: String,
    sha256: String,
}

/// The warm snapshot a job on a store image would use or make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warm {
    pub scope: PathBuf,
    pub name: String,
    pub image: String,
    pub sha256: String,
}

/// Where warm snapshots live.
pub fn scope(config: &Config) -> PathBuf {
    config.snapshot_dir.join("warm")
}

/// The warm snapshot for `image` in `slot`, if warm snapshots are on and it is a store
/// image (whose `image.json` has the ext4 file's SHA-256).
pub fn for_image(config: &Config, image: &Image, slot: u32) -> Result<Option<Warm>> {
    if !config.warm_snapshots {
        return Ok(None);
    }
    let (Some(store), Some(kernel)) = (&image.store, &image.kernel) else {
        return Ok(None);
    };
    let Some(sha256) = image_sha256(store, &image.name)? else {
        return Ok(None);
    };
    let kernel_meta =
        std::fs::metadata(kernel).with_context(|| format!("cannot read {}", kernel.display()))?;
    let mtime = kernel_meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let net = config
        .net
        .as_ref()
        .map(|n| n.replace("{id}", &slot.to_string()));
    let frozen = format!(
        "{}\n{}\n{mtime}\n{}\n{}\n{net:?}\n{}",
        kernel.display(),
        kernel_meta.len(),
        config.memory_mib,
        config.vcpus,
        config.jail.is_some()
    );
    let frozen = format!("{:x}", Sha256::digest(frozen.as_bytes()));
    Ok(Some(Warm {
        scope: scope(config),
        name: format!("{}-{}", &sha256[..sha256.len().min(16)], &frozen[..8]),
        image: image.name.clone(),
        sha256,
    }))
}

/// The `sha256` (of the ext4 file) in store image `name`'s `image.json`.
fn image_sha256(store: &Path, name: &str) -> Result<Option<String>> {
    #[derive(Deserialize)]
    struct Meta {
        #[serde(default)]
        sha256: String,
    }
    let path = store.join(name).join("image.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let meta: Meta = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a kiln image.json", path.display()))?;
    Ok(Some(meta.sha256).filter(|s| s.len() >= 16 && s.bytes().all(|b| b.is_ascii_hexdigit())))
}

impl Warm {
    pub fn dir(&self) -> PathBuf {
        self.scope.join(&self.name)
    }

    /// The snapshot, if it is complete and the store image it was taken of (for a jailed
    /// restore, by its name) still has the same disk; marks it used.
    pub fn ready(&self, store: &Path) -> Option<PathBuf> {
        let dir = self.dir();
        if !dir.join("state").is_file() {
            return None;
        }
        let record: Record = std::fs::read_to_string(dir.join(RECORD))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())?;
        if record.sha256 != self.sha256 || image_sha256(store, &record.image).ok()?? != self.sha256
        {
            return None;
        }
        let _ = std::fs::File::options()
            .write(true)
            .open(dir.join(RECORD))
            .and_then(|f| f.set_modified(SystemTime::now()));
        Some(dir)
    }

    /// Records what the new snapshot in [`Warm::dir`] was taken of.
    pub fn record(&self) -> Result<()> {
        let record = Record {
            image: self.image.clone(),
            sha256: self.sha256.clone(),
        };
        let path = self.dir().join(RECORD);
        std::fs::write(&path, serde_json::to_string(&record)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// The limits of the warm snapshots kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_age: Duration,
}

/// Removes, besides `keep`: the warm snapshots of `keep`'s image with another disk, those
/// unused for longer than the age limit, then the least recently used until the rest fit
/// the size limit. Returns the names removed.
pub fn prune(keep: &Warm, limits: Limits) -> Vec<String> {
    let now = SystemTime::now();
    let mut others: Vec<(String, PathBuf, SystemTime, u64, Option<Record>)> =
        std::fs::read_dir(&keep.scope)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                if name.starts_with('.') || name == keep.name {
                    return None;
                }
                let dir = e.path();
                let used = std::fs::metadata(dir.join(RECORD))
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                let record = std::fs::read_to_string(dir.join(RECORD))
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok());
                Some((name, dir.clone(), used, disk_bytes(&dir), record))
            })
            .collect();
    let mut removed = Vec::new();
    let remove = |name: &str, dir: &Path, removed: &mut Vec<String>| {
        if std::fs::remove_dir_all(dir).is_ok() {
            removed.push(name.to_string());
        }
    };
    others.retain(|(name, dir, used, _, record)| {
        let superseded = record
            .as_ref()
            .is_some_and(|r| r.image == keep.image && r.sha256 != keep.sha256);
        let old = now.duration_since(*used).unwrap_or_default() >= limits.max_age;
        if superseded || old {
            remove(name, dir, &mut removed);
            false
        } else {
            true
        }
    });
    let mut total = disk_bytes(&keep.dir()) + others.iter().map(|o| o.3).sum::<u64>();
    others.sort_by_key(|o| o.2);
    for (name, dir, _, bytes, _) in &others {
        if total <= limits.max_bytes {
            break;
        }
        remove(name, dir, &mut removed);
        total = total.saturating_sub(*bytes);
    }
    removed
}

/// The disk space of the files in `dir` (memory files are sparse).
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigFile, Env};

    fn config(dir: &Path, warm: bool) -> Config {
        let mut c = Config::from_file(ConfigFile::default(), &Env::default());
        c.snapshot_dir = dir.join("snaps");
        c.image_store = dir.join("store");
        c.warm_snapshots = warm;
        c
    }

    fn store_image(dir: &Path, name: &str, sha: &str) -> Image {
        std::fs::create_dir_all(dir.join("store").join(name)).unwrap();
        std::fs::write(
            dir.join("store").join(name).join("image.json"),
            format!(r#"{{"name":"{name}","sha256":"{sha}"}}"#),
        )
        .unwrap();
        std::fs::write(dir.join("kernel"), b"k").unwrap();
        Image {
            name: name.to_string(),
            kernel: Some(dir.join("kernel")),
            initrd: None,
            vm_config: None,
            store: Some(dir.join("store")),
        }
    }

    /// A finished warm snapshot of `w` holding `bytes` of memory.
    fn take(w: &Warm, bytes: usize) {
        std::fs::create_dir_all(w.dir()).unwrap();
        std::fs::write(w.dir().join("state"), b"s").unwrap();
        std::fs::write(w.dir().join("memory"), vec![1u8; bytes]).unwrap();
        w.record().unwrap();
    }

    #[test]
    fn keys_follow_the_disk_and_the_vm() {
        let dir = tempfile::tempdir().unwrap();
        let image = store_image(dir.path(), "a", &"ab".repeat(32));
        assert_eq!(
            for_image(&config(dir.path(), false), &image, 0).unwrap(),
            None
        );
        let c = config(dir.path(), true);
        let w = for_image(&c, &image, 0).unwrap().unwrap();
        assert!(w.name.starts_with("abababababababab-"), "{}", w.name);
        assert_eq!(
            for_image(&c, &image, 3).unwrap().unwrap().name,
            w.name,
            "no net"
        );
        let mut bigger = c.clone();
        bigger.memory_mib *= 2;
        assert_ne!(for_image(&bigger, &image, 0).unwrap().unwrap().name, w.name);
        let mut net = c.clone();
        net.net = Some("tap=kiln{id}".into());
        assert_ne!(
            for_image(&net, &image, 0).unwrap().unwrap().name,
            for_image(&net, &image, 1).unwrap().unwrap().name
        );
        let dirs = Image {
            store: None,
            ..image.clone()
        };
        assert_eq!(
            for_image(&c, &dirs, 0).unwrap(),
            None,
            "image directories: none"
        );

        assert_eq!(w.ready(&c.image_store), None);
        take(&w, 10);
        assert_eq!(w.ready(&c.image_store), Some(w.dir()));
        // The image was replaced by another disk: the snapshot no longer fits.
        store_image(dir.path(), "a", &"cd".repeat(32));
        assert_eq!(w.ready(&c.image_store), None);
    }

    #[test]
    fn pruning_drops_superseded_old_and_least_used() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path(), true);
        let warm = |name: &str, sha: &str| {
            for_image(&c, &store_image(dir.path(), name, sha), 0)
                .unwrap()
                .unwrap()
        };
        let old_a = warm("a", &"01".repeat(32));
        let b = warm("b", &"02".repeat(32));
        let d = warm("d", &"04".repeat(32));
        let new_a = warm("a", &"03".repeat(32));
        for w in [&old_a, &b, &d, &new_a] {
            take(w, 64 << 10);
        }
        // d was used long ago, b just now.
        let long_ago = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(d.dir().join(RECORD))
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        let roomy = Limits {
            max_bytes: u64::MAX,
            max_age: Duration::from_secs(7200),
        };
        assert_eq!(prune(&new_a, roomy), vec![old_a.name.clone()]);
        let tight = Limits {
            max_bytes: 3 * (64 << 10) - 1,
            max_age: Duration::from_secs(7200),
        };
        assert_eq!(
            prune(&new_a, tight),
            vec![d.name.clone()],
            "least recently used first"
        );
        assert!(b.dir().exists() && new_a.dir().exists());
        let short = Limits {
            max_bytes: u64::MAX,
            max_age: Duration::from_secs(0),
        };
        assert_eq!(prune(&new_a, short), vec![b.name.clone()]);
        assert!(new_a.dir().exists(), "the one just taken stays");
    }
}
