//! `kiln image import` of an image kept outside a registry: a `docker save` archive
//! (`manifest.json` naming a config and layer files) or an OCI image layout directory
//! (`oci-layout`, `index.json`, `blobs/sha256/…`). Either is read into the staging
//! directory and its layers applied like a pull's (`layer`), whiteouts and all.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::layer;
use super::{job_defaults, JobDefaults, Platform, PullError};
use crate::image::import::ImportSpec;
use crate::image::{rootfs, ImageError, ImageMeta, Source, Store};

/// The two kinds of image archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    DockerSave,
    OciLayout,
}

/// Which kind of image archive `path` is, if it is one (not a plain filesystem tarball).
pub fn detect(path: &Path) -> Option<Kind> {
    if path.is_dir() {
        return path.join("oci-layout").is_file().then_some(Kind::OciLayout);
    }
    // Only a regular file can be read twice (a FIFO or device is left to the plain
    // import, which reads it once).
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return None;
    }
    let file = std::fs::File::open(path).ok()?;
    let mut archive = tar::Archive::new(file);
    let found = archive.entries().ok()?.flatten().any(|e| {
        let p = e.path_bytes();
        p.as_ref() == b"manifest.json" || p.as_ref() == b"./manifest.json"
    });
    found.then_some(Kind::DockerSave)
}

/// Imports the image archive into `store`.
pub fn import(
    store: &Store,
    spec: &ImportSpec,
    kind: Kind,
    path: &Path,
) -> Result<(PathBuf, ImageMeta), PullError> {
    crate::image::require_root(
        "kiln image import",
        "the layers' owners, modes and device nodes are kept only when root writes them",
    )?;
    rootfs::mkfs()?;
    let path = &std::path::absolute(path).map_err(ImageError::io("cannot resolve", path))?;
    let staging = store.stage(&spec.name, spec.force)?;
    let root = match kind {
        Kind::OciLayout => path.to_owned(),
        Kind::DockerSave => {
            let out = staging.dir().join("archive");
            std::fs::create_dir(&out).map_err(ImageError::io("cannot create", &out))?;
            let file = std::fs::File::open(path).map_err(ImageError::io("cannot read", path))?;
            // The tar reader's unpack keeps every entry inside `out`.
            tar::Archive::new(file)
                .unpack(&out)
                .map_err(|e| bad(path, &format!("cannot be read: {e}")))?;
            out
        }
    };
    let image = match kind {
        Kind::OciLayout => oci_layout(&root, path)?,
        Kind::DockerSave => docker_save(&root, path)?,
    };
    let tree = staging.tree();
    std::fs::create_dir(&tree).map_err(ImageError::io("cannot create", &tree))?;
    for blob in &image.layers {
        crate::image::interrupt::check()?;
        layer::apply(&tree, blob).map_err(|cause| PullError::Layer {
            reference: path.display().to_string(),
            digest: blob.display().to_string(),
            cause,
        })?;
    }
    if kind == Kind::DockerSave {
        let dir = staging.dir().join("archive");
        std::fs::remove_dir_all(&dir).map_err(ImageError::io("cannot remove", &dir))?;
    }
    let prefix = match kind {
        Kind::OciLayout => "oci",
        Kind::DockerSave => "docker-archive",
    };
    let mut defaults = image.defaults;
    defaults.resolve_user(&tree);
    let source = Source::Oci {
        reference: format!("{prefix}:{}", path.display()),
        digest: image.digest,
        platform: Platform::default().to_string(),
        defaults,
    };
    Ok(rootfs::finish(
        staging,
        &spec.name,
        source,
        &spec.agent,
        spec.size_mib,
    )?)
}

/// What an archive holds: its layer files in order, config defaults, and a digest.
struct Image {
    layers: Vec<PathBuf>,
    defaults: JobDefaults,
    digest: String,
}

fn bad(path: &Path, reason: &str) -> PullError {
    PullError::BadArchive {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// A file of the archive, by a relative name the archive gave (never outside `root`).
fn inside(root: &Path, archive: &Path, name: &str) -> Result<PathBuf, PullError> {
    let rel = Path::new(name);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(bad(
            archive,
            &format!("names {name:?}, outside the archive"),
        ));
    }
    let path = root.join(rel);
    if path.is_file() {
        Ok(path)
    } else {
        Err(bad(archive, &format!("has no file {name:?}")))
    }
}

fn read_json(path: &Path, archive: &Path) -> Result<(Vec<u8>, serde_json::Value), PullError> {
    let data = std::fs::read(path).map_err(ImageError::io("cannot read", path))?;
    let value = serde_json::from_slice(&data).map_err(|e| {
        bad(
            archive,
            &format!(
                "{} is not JSON: {e}",
                path.file_name().unwrap_or_default().to_string_lossy()
            ),
        )
    })?;
    Ok((data, value))
}

fn docker_save(root: &Path, archive: &Path) -> Result<Image, PullError> {
    let (_, manifest) = read_json(&root.join("manifest.json"), archive)?;
    let entries = manifest.as_array().map(Vec::as_slice).unwrap_or_default();
    let [entry] = entries else {
        return Err(bad(
            archive,
            &format!(
                "holds {} images; import an archive of one (docker save IMAGE)",
                entries.len()
            ),
        ));
    };
    let text = |v: &serde_json::Value| v.as_str().map(str::to_string);
    let config_name = entry
        .get("Config")
        .and_then(text)
        .ok_or_else(|| bad(archive, "manifest.json has no Config"))?;
    let (config, _) = read_json(&inside(root, archive, &config_name)?, archive)?;
    let defaults = job_defaults(&config).map_err(|e| bad(archive, &e.to_string()))?;
    let layers = entry
        .get("Layers")
        .and_then(|l| l.as_array())
        .ok_or_else(|| bad(archive, "manifest.json has no Layers"))?
        .iter()
        .map(|l| {
            let name = text(l).ok_or_else(|| bad(archive, "a layer name is not a string"))?;
            inside(root, archive, &name)
        })
        .collect::<Result<_, _>>()?;
    Ok(Image {
        layers,
        defaults,
        digest: sha256(&config),
    })
}

/// A blob of the layout, its digest checked.
fn blob(root: &Path, archive: &Path, digest: &str) -> Result<PathBuf, PullError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| bad(archive, &format!("names the digest {digest:?}, not sha256")))?;
    let path = inside(root, archive, &format!("blobs/sha256/{hex}"))?;
    let actual = format!("sha256:{}", crate::image::sha256_file(&path)?);
    if actual != digest {
        return Err(bad(
            archive,
            &format!("blob {digest} has the digest {actual}: it is corrupt"),
        ));
    }
    Ok(path)
}

fn oci_layout(root: &Path, archive: &Path) -> Result<Image, PullError> {
    let want = Platform::default();
    let (_, mut node) = read_json(&root.join("index.json"), archive)?;
    // Down through indexes to the image manifest for the platform.
    for _ in 0..4 {
        let Some(manifests) = node.get("manifests").and_then(|m| m.as_array()) else {
            break;
        };
        let pick = manifests
            .iter()
            .find(|m| {
                let p = &m["platform"];
                p["os"] == want.os.as_str() && p["architecture"] == want.arch.as_str()
            })
            .or_else(|| (manifests.len() == 1).then(|| &manifests[0]))
            .ok_or_else(|| bad(archive, &format!("has no image for {want}")))?;
        let digest = pick["digest"].as_str().unwrap_or_default().to_string();
        let (data, value) = read_json(&blob(root, archive, &digest)?, archive)?;
        if value.get("layers").is_some() {
            let (config, _) = read_json(
                &blob(
                    root,
                    archive,
                    value["config"]["digest"].as_str().unwrap_or_default(),
                )?,
                archive,
            )?;
            let defaults = job_defaults(&config).map_err(|e| bad(archive, &e.to_string()))?;
            let layers = value["layers"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|l| blob(root, archive, l["digest"].as_str().unwrap_or_default()))
                .collect::<Result<_, _>>()?;
            return Ok(Image {
                layers,
                defaults,
                digest: sha256(&data),
            });
        }
        node = value;
    }
    Err(bad(archive, "index.json leads to no image manifest"))
}
