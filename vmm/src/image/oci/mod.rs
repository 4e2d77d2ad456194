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
#[cfg(feature = "registry")]
mod pull;
#[cfg(feature = "registry")]
pub mod registry;
pub mod user;

#[cfg(feature = "registry")]
pub use pull::pull;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ImageError, ImageMeta};

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
