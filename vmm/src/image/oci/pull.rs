//! Pulling from a registry (the `registry` feature): the manifest, the config and the
//! layers over the OCI distribution protocol, then the image made like any other.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use oci_client::manifest::OciDescriptor;
use oci_client::Reference;

use super::registry::{Registry, RegistryError};
use super::{auth, job_defaults, layer, Platform, PullError, PullSpec, Pulled};
use crate::image::{check_name, require_root, rootfs, ImageError, ImageMeta, Source, Store};

/// The digest index's directory in the store.
const DIGESTS_DIR: &str = ".digests";

impl Platform {
    pub(super) fn matches(&self, p: &oci_client::manifest::Platform) -> bool {
        p.os.to_string() == self.os
            && p.architecture.to_string() == self.arch
            && self
                .variant
                .as_ref()
                .is_none_or(|v| p.variant.as_deref() == Some(v))
    }
}

/// Pulls `spec.reference` into `store`.
pub fn pull(store: &Store, spec: &PullSpec) -> Result<Pulled, PullError> {
    require_root(
        "kiln image pull",
        "the layers' owners, modes and device nodes are kept only when root writes them",
    )?;
    rootfs::mkfs()?;
    let reference: Reference = spec
        .reference
        .parse()
        .map_err(|e: oci_client::ParseError| {
            PullError::BadReference(spec.reference.clone(), e.to_string())
        })?;
    let name = match &spec.name {
        Some(n) => n.clone(),
        None => {
            default_name(&reference).ok_or_else(|| PullError::NoName(spec.reference.clone()))?
        }
    };
    check_name(&name)?;
    let credentials = auth::lookup(reference.registry())?;
    let registry = Registry::new(&spec.insecure, &spec.platform, credentials.as_ref())?;
    let whole = reference.whole();
    let failed = |e: RegistryError| {
        let host = reference.registry();
        let hint = match (&credentials, e.unauthorized) {
            (Some(c), true) => format!(
                " (the registry refused the credentials for {host} from {}: check them)",
                c.from
            ),
            (None, true) => format!(
                " (no credentials for {host}: add them to ~/.docker/config.json or ${})",
                auth::AUTH_CONFIG_ENV
            ),
            _ if e.message.contains("no entry found in image index") => format!(
                " (the index has no image for {}: choose another with --platform)",
                spec.platform
            ),
            _ => String::new(),
        };
        PullError::Registry {
            reference: whole.clone(),
            reason: e.message,
            hint,
        }
    };
    let (manifest, digest) = registry.manifest(&reference).map_err(failed)?;
    progress(&format!("{whole}: manifest {digest}"));

    if let Some(pulled) = already_stored(store, &name, &digest, spec.force)? {
        return Ok(pulled);
    }
    // Refuses an existing name (without --force) before any layer is fetched.
    let staging = store.stage(&name, spec.force)?;

    let config = registry
        .blob(&reference, &manifest.config)
        .map_err(failed)?;
    let mut defaults = job_defaults(&config).map_err(|source| PullError::BadConfig {
        reference: whole.clone(),
        digest: manifest.config.digest.clone(),
        source,
    })?;
    let tree = staging.tree();
    std::fs::create_dir(&tree).map_err(ImageError::io("cannot create", &tree))?;
    let count = manifest.layers.len();
    for (i, desc) in manifest.layers.iter().enumerate() {
        check_layer_type(&whole, desc)?;
        progress(&format!(
            "{whole}: layer {}/{count} {} ({:.1} MiB)",
            i + 1,
            desc.digest,
            desc.size as f64 / f64::from(1u32 << 20)
        ));
        let blob = staging.dir().join(format!("layer-{i}"));
        let fetch_start = std::time::Instant::now();
        registry
            .blob_to_file(&reference, desc, &blob)
            .map_err(failed)?;
        let bytes = std::fs::metadata(&blob).map_or(0, |m| m.len());
        progress(&format!(
            "{whole}: layer {}/{count}: {bytes} bytes in {:.1} s",
            i + 1,
            fetch_start.elapsed().as_secs_f64()
        ));
        crate::image::interrupt::check()?;
        layer::apply(&tree, &blob).map_err(|cause| PullError::Layer {
            reference: whole.clone(),
            digest: desc.digest.clone(),
            cause,
        })?;
        std::fs::remove_file(&blob).map_err(ImageError::io("cannot remove", &blob))?;
        crate::image::interrupt::check()?;
    }
    defaults.resolve_user(&tree);
    let source = Source::Oci {
        reference: whole.clone(),
        digest: digest.clone(),
        platform: spec.platform.to_string(),
        defaults,
    };
    let (dir, meta) = rootfs::finish(staging, &name, source, &spec.agent, spec.size_mib)?;
    index_digest(store, &digest, &name)?;
    Ok(Pulled {
        dir,
        meta,
        digest,
        fetched: true,
    })
}

/// The store's image of manifest `digest`, when it has one: under `name` already (nothing
/// to do), or under another name (hard-linked to `name`, no layer fetched).
fn already_stored(
    store: &Store,
    name: &str,
    digest: &str,
    force: bool,
) -> Result<Option<Pulled>, PullError> {
    let stored_digest = |n: &str| match store.meta(n) {
        Ok(ImageMeta {
            source: Source::Oci { digest: d, .. },
            ..
        }) => Some(d),
        _ => None,
    };
    if stored_digest(name).as_deref() == Some(digest) {
        let meta = store.meta(name)?;
        return Ok(Some(Pulled {
            dir: store.dir().join(name),
            meta,
            digest: digest.to_string(),
            fetched: false,
        }));
    }
    let link = digest_link(store, digest);
    let Some(other) = std::fs::read_link(&link)
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
    else {
        return Ok(None);
    };
    if stored_digest(&other).as_deref() != Some(digest) {
        return Ok(None); // a stale entry: the image was removed or replaced
    }
    let staging = store.stage(name, force)?;
    let mut meta = store.meta(&other)?;
    let from = store.dir().join(&other).join(crate::image::ROOTFS_FILE);
    std::fs::hard_link(&from, staging.ext4()).map_err(ImageError::io("cannot link", &from))?;
    meta.name = name.to_string();
    progress(&format!(
        "{name}: the store has {digest} as {other}: linked"
    ));
    let dir = staging.commit(&meta)?;
    Ok(Some(Pulled {
        dir,
        meta,
        digest: digest.to_string(),
        fetched: false,
    }))
}

fn digest_link(store: &Store, digest: &str) -> PathBuf {
    store.dir().join(DIGESTS_DIR).join(digest.replace(':', "-"))
}

/// Points the digest index's entry for `digest` at image `name`.
fn index_digest(store: &Store, digest: &str, name: &str) -> Result<(), ImageError> {
    let link = digest_link(store, digest);
    let dir = store.dir().join(DIGESTS_DIR);
    std::fs::create_dir_all(&dir).map_err(ImageError::io("cannot create", &dir))?;
    let tmp = dir.join(format!(".new-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(Path::new("..").join(name), &tmp)
        .map_err(ImageError::io("cannot create", &tmp))?;
    std::fs::rename(&tmp, &link).map_err(ImageError::io("cannot create", &link))
}

/// `debian:bookworm` for `docker.io/library/debian:bookworm`; the digest's first 12 hex
/// digits stand in for a missing tag.
fn default_name(reference: &Reference) -> Option<String> {
    let repo = reference.repository().rsplit('/').next()?;
    let suffix = match (reference.tag(), reference.digest()) {
        (Some(tag), _) => tag.to_string(),
        (None, Some(d)) => d.split(':').nth(1)?.chars().take(12).collect(),
        (None, None) => "latest".to_string(),
    };
    let name = format!("{repo}:{suffix}");
    check_name(&name).ok().map(|()| name)
}

/// Layers are tar archives, plain, gzip or zstd (OCI and Docker media types alike);
/// anything else (an artifact, a foreign layer) cannot become a root filesystem.
fn check_layer_type(reference: &str, desc: &OciDescriptor) -> Result<(), PullError> {
    let t = desc.media_type.as_str();
    let ok = t.starts_with("application/vnd.oci.image.layer.")
        || t.starts_with("application/vnd.docker.image.rootfs.diff.tar");
    if ok && !t.contains("foreign") {
        Ok(())
    } else {
        Err(PullError::LayerType {
            reference: reference.to_string(),
            digest: desc.digest.clone(),
            media_type: t.to_string(),
        })
    }
}

/// A progress line on stderr, when a person is watching it.
fn progress(line: &str) {
    if std::io::stderr().is_terminal() {
        eprintln!("kiln: {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_come_from_the_reference() {
        let name = |r: &str| default_name(&r.parse().unwrap());
        assert_eq!(name("debian:bookworm").as_deref(), Some("debian:bookworm"));
        assert_eq!(
            name("127.0.0.1:5000/a/b/tool:1.2").as_deref(),
            Some("tool:1.2")
        );
        let d = format!("alpine@sha256:{}", "ab".repeat(32));
        assert_eq!(name(&d).as_deref(), Some("alpine:abababababab"));
    }
}
