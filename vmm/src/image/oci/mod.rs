//! `kiln image pull`: an OCI (or Docker) image from a registry made into a root disk.
//!
//! The manifest is resolved first (through an index, the one for `--platform`); its
//! digest names the image in the store's digest index, so that pulling what the store
//! already has costs the manifest request alone. Otherwise the config and the layers are
//! fetched into the staging directory (each blob's digest checked), the layers applied in
//! order onto the tree (`layer`), and the tree packed like any other image (`rootfs`).
//!
//! Digest index: `<store>/.digests/sha256-<hex>` is a symlink to `../<name>`, the image
//! made from that manifest. A pull of the same digest under another name hard-links the
//! existing ext4 file instead of rebuilding it.

pub mod archive;
pub mod auth;
pub mod layer;
pub mod registry;
pub mod user;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use oci_client::manifest::OciDescriptor;
use oci_client::Reference;
use serde::{Deserialize, Serialize};

use super::{check_name, require_root, rootfs, ImageError, ImageMeta, Source, Store};
use registry::{Registry, RegistryError};

/// The digest index's directory in the store.
const DIGESTS_DIR: &str = ".digests";

/// What to pull.
#[derive(Debug, Clone)]
pub struct PullSpec {
    /// The image reference: `[REGISTRY/]REPOSITORY[:TAG][@DIGEST]` (Docker Hub when no
    /// registry is named).
    pub reference: String,
    /// The store name; default: the repository's last part and the tag (`debian:bookworm`).
    pub name: Option<String>,
    pub platform: Platform,
    /// Registries (`HOST[:PORT]`) spoken to over plain HTTP.
    pub insecure: Vec<String>,
    pub size_mib: Option<u64>,
    pub agent: PathBuf,
    pub force: bool,
}

/// An image's operating system, architecture and (optionally) variant: `linux/amd64`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl std::str::FromStr for Platform {
    type Err = PullError;
    fn from_str(s: &str) -> Result<Self, PullError> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts[..] {
            [os, arch] | [os, arch, _] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                arch: arch.to_string(),
                variant: parts.get(2).map(|v| v.to_string()),
            }),
            _ => Err(PullError::BadPlatform(s.to_string())),
        }
    }
}

/// linux/amd64: what kiln's guests run.
impl Default for Platform {
    fn default() -> Self {
        Platform {
            os: "linux".into(),
            arch: "amd64".into(),
            variant: None,
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Platform {
    fn matches(&self, p: &oci_client::manifest::Platform) -> bool {
        p.os.to_string() == self.os
            && p.architecture.to_string() == self.arch
            && self
                .variant
                .as_ref()
                .is_none_or(|v| p.variant.as_deref() == Some(v))
    }
}

/// What the image's config asks of the processes it runs, kept as a job's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobDefaults {
    /// `NAME=value` lines.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: String,
    /// `user[:group]`, names or numbers; empty is root.
    #[serde(default)]
    pub user: String,
    /// `user` resolved in the image's `/etc/passwd` and `/etc/group` when it was made: the
    /// ids (and home) jobs run with. Absent in images made before these were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
    /// Why `user` could not be resolved (a name the image does not list): jobs refuse to
    /// run as root in its place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_error: Option<String>,
}

impl JobDefaults {
    /// Records what `user` means in the image tree `tree`.
    pub fn resolve_user(&mut self, tree: &Path) {
        match user::resolve(tree, &self.user) {
            Ok(ids) => {
                self.uid = Some(ids.uid);
                self.gid = Some(ids.gid);
                self.home = ids.home;
            }
            Err(e) => self.user_error = Some(e.to_string()),
        }
    }
}

/// Why a pull failed; each says which image and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Auth(#[from] auth::AuthConfigError),
    #[error("{0:?} is not an image reference ({1}); write [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST], e.g. docker.io/library/debian:bookworm")]
    BadReference(String, String),
    #[error("--platform {0:?} is not OS/ARCH[/VARIANT] (e.g. linux/amd64)")]
    BadPlatform(String),
    #[error("cannot name the image after {0:?}; give it a name with --name")]
    NoName(String),
    #[error("cannot pull {reference}: {reason}{hint}")]
    Registry {
        reference: String,
        reason: String,
        hint: String,
    },
    #[error("{reference}: the image's config {digest} is not valid JSON: {source}")]
    BadConfig {
        reference: String,
        digest: String,
        source: serde_json::Error,
    },
    #[error("{reference}: layer {digest} has media type {media_type:?}, which is not a tar archive kiln can apply")]
    LayerType {
        reference: String,
        digest: String,
        media_type: String,
    },
    #[error("{reference}: layer {digest}: {cause}")]
    Layer {
        reference: String,
        digest: String,
        cause: layer::LayerError,
    },
    #[error("the image archive {path}: {reason}")]
    BadArchive { path: PathBuf, reason: String },
    #[error("cannot start the network runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot set up the registry client: {0} (a host without CA certificates needs Debian's ca-certificates, even for --insecure-registry)")]
    Client(String),
}

/// What a pull did.
#[derive(Debug)]
pub struct Pulled {
    pub dir: PathBuf,
    pub meta: ImageMeta,
    /// The manifest digest.
    pub digest: String,
    /// False when the store already had the digest (only the manifest was fetched).
    pub fetched: bool,
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
        super::interrupt::check()?;
        layer::apply(&tree, &blob).map_err(|cause| PullError::Layer {
            reference: whole.clone(),
            digest: desc.digest.clone(),
            cause,
        })?;
        std::fs::remove_file(&blob).map_err(ImageError::io("cannot remove", &blob))?;
        super::interrupt::check()?;
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
    let from = store.dir().join(&other).join(super::ROOTFS_FILE);
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

/// The Env, WorkingDir and User of an image config.
fn job_defaults(config: &[u8]) -> Result<JobDefaults, serde_json::Error> {
    #[derive(Deserialize)]
    struct Config {
        #[serde(default)]
        config: Option<Inner>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Inner {
        #[serde(default)]
        env: Option<Vec<String>>,
        #[serde(default)]
        working_dir: Option<String>,
        #[serde(default)]
        user: Option<String>,
    }
    let c: Config = serde_json::from_slice(config)?;
    let inner = c.config.unwrap_or(Inner {
        env: None,
        working_dir: None,
        user: None,
    });
    Ok(JobDefaults {
        env: inner.env.unwrap_or_default(),
        working_dir: inner.working_dir.unwrap_or_default(),
        user: inner.user.unwrap_or_default(),
        ..JobDefaults::default()
    })
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
    fn platforms_parse_and_print() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!("linux/amd64".parse::<Platform>().unwrap().arch, "amd64");
        for bad in ["linux", "/amd64", "a/b/c/d", ""] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
    }

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

    #[test]
    fn job_defaults_come_from_the_config() {
        let d = job_defaults(
            br#"{"architecture":"amd64","config":{"Env":["PATH=/bin","A=b"],"WorkingDir":"/src","User":"1000:1000"}}"#,
        )
        .unwrap();
        assert_eq!(d.env, ["PATH=/bin", "A=b"]);
        assert_eq!(
            (d.working_dir.as_str(), d.user.as_str()),
            ("/src", "1000:1000")
        );
        assert_eq!(job_defaults(b"{}").unwrap(), JobDefaults::default());
        assert!(job_defaults(b"[").is_err());
    }
}
