//! Root-disk images for jobs: a local store of named ext4 images (`store`), and the two
//! ways of making one — `kiln image build` with Debian's debootstrap (`build`) and `kiln
//! image import` of a container filesystem tarball (`import`). Both end in `rootfs`, which
//! installs the guest agent as the image's init and packs the tree with `mkfs.ext4 -d`.
//! `kiln image pull` (`oci`) makes the tree from an OCI image's layers, from a registry.
//!
//! An image boots through the root-disk path (`--root-disk`, or `--image NAME`): the kernel
//! mounts it as `/` and runs [`crate::disk::ROOT_INIT`], the agent, as PID 1.

pub mod build;
mod cleanup;
pub mod import;
pub mod interrupt;
pub mod oci;
pub mod rootfs;
pub mod store;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use store::Store;

/// The filesystem image in an image's directory.
pub const ROOTFS_FILE: &str = "rootfs.ext4";
/// The metadata file in an image's directory.
pub const META_FILE: &str = "image.json";
/// Metadata format version, bumped when [`ImageMeta`] changes incompatibly.
pub const META_VERSION: u32 = 1;

/// What went wrong with an image or the store, phrased for the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "image name {0:?} is not valid: use 1 to 64 letters, digits, `-`, `_`, `.` and `:` \
         (as in debian:bookworm, what a CI job's `image:` says), starting with a letter or digit"
    )]
    BadName(String),
    #[error("no image {name:?} in the store {store}; the images there are: {available} (make one with `kiln image build --name {name}` or `kiln image import`)")]
    NotFound {
        name: String,
        store: PathBuf,
        available: String,
    },
    #[error("image {name:?} already exists in {store}; pass --force to replace it, or `kiln image rm {name}` first")]
    Exists { name: String, store: PathBuf },
    #[error("image {name:?}: {path} is not an ext4 filesystem (no superblock magic 0xEF53 at byte 1080); rebuild it with --force")]
    NotExt4 { name: String, path: PathBuf },
    #[error("image {name:?}: {path} has SHA-256 {actual}, but its image.json records {recorded}: the file changed or is corrupt since it was made; rebuild it with --force")]
    Modified {
        name: String,
        path: PathBuf,
        recorded: String,
        actual: String,
    },
    #[error("image {name:?}: its metadata {path} cannot be read: {reason}")]
    BadMeta {
        name: String,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} needs root ({why}); run it as root, e.g. with sudo")]
    NotRoot {
        what: &'static str,
        why: &'static str,
    },
    #[error("{tool} not found (looked in $PATH, /usr/sbin and /sbin): install it with `apt-get install {package}` (`cargo xtask setup` does)")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("the guest agent {path}: {reason}; build it statically (docs/disks-and-images.md) and pass --agent PATH")]
    BadAgent { path: PathBuf, reason: String },
    #[error("package name {0:?} is not valid: Debian package names are letters, digits, `+`, `-`, `.` (and `:arch`)")]
    BadPackage(String),
    #[error("{what} failed ({status}){hint}")]
    Tool {
        what: String,
        status: std::process::ExitStatus,
        hint: String,
    },
    #[error("cannot catch signals during the build: {0}")]
    Signals(std::io::Error),
    #[error("interrupted by signal {0}; the unfinished image was removed")]
    Interrupted(i32),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ImageError {
    pub(crate) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| ImageError::Io { what, path, source }
    }
}

/// Where an image came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// `kiln image build`: debootstrap of `suite` from `mirror` with `packages` added.
    Debootstrap {
        suite: String,
        mirror: String,
        packages: Vec<String>,
    },
    /// `kiln image import`: a tarball of a filesystem, and its SHA-256.
    Import { tarball: PathBuf, sha256: String },
    /// `kiln image pull`: an OCI image `reference`, its manifest `digest` (for
    /// `platform`), and the config's Env, WorkingDir and User as job defaults.
    Oci {
        reference: String,
        digest: String,
        platform: String,
        defaults: oci::JobDefaults,
    },
}

impl Source {
    /// One short line for `kiln image ls`.
    pub fn summary(&self) -> String {
        match self {
            Source::Debootstrap {
                suite, packages, ..
            } if packages.is_empty() => format!("debian {suite}"),
            Source::Debootstrap {
                suite, packages, ..
            } => format!("debian {suite} +{}", packages.join(",")),
            Source::Import { tarball, .. } => format!("import {}", tarball.display()),
            Source::Oci {
                reference, digest, ..
            } => format!("oci {reference} ({})", &digest[..digest.len().min(19)]),
        }
    }
}

/// `image.json`: what `kiln image ls` shows and what a reader needs to trust the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    pub version: u32,
    pub name: String,
    pub source: Source,
    /// Seconds since the Unix epoch, UTC.
    pub created_unix: u64,
    /// The size of the ext4 file (the disk the guest sees), in bytes.
    pub size_bytes: u64,
    /// The bytes of files in the image's tree (what the filesystem holds).
    pub content_bytes: u64,
    /// SHA-256 of the ext4 file, hex.
    pub sha256: String,
    /// SHA-256 of the agent installed as `/sbin/kiln-agent`, hex.
    pub agent_sha256: String,
}

/// Checks that `name` can be a directory in the store (and cannot climb out of it). The
/// characters are those `kiln-gitlab` accepts in `CI_JOB_IMAGE`, so that a job's `image:
/// debian:bookworm` can name a store image.
pub fn check_name(name: &str) -> Result<(), ImageError> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadName(name.to_string()))
    }
}

/// Fails unless kiln runs as root: both builders create device nodes and files of other
/// owners, which only root can, and the image must keep them as they are.
pub(crate) fn require_root(what: &'static str, why: &'static str) -> Result<(), ImageError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        Ok(())
    } else {
        Err(ImageError::NotRoot { what, why })
    }
}

/// Finds an external tool in `$PATH` or the sbin directories (which a non-login root shell
/// may not have in `$PATH`).
pub(crate) fn find_tool(tool: &'static str, package: &'static str) -> Result<PathBuf, ImageError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .ok_or(ImageError::MissingTool { tool, package })
}

/// Runs `cmd`, its output going to kiln's stderr (debootstrap's progress is worth seeing);
/// a non-zero exit becomes [`ImageError::Tool`] with `hint` appended.
pub(crate) fn run_tool(
    mut cmd: std::process::Command,
    what: String,
    hint: &str,
) -> Result<(), ImageError> {
    interrupt::check()?;
    let program = PathBuf::from(cmd.get_program());
    cmd.stdout(std::process::Stdio::from(std::io::stderr()));
    let status = interrupt::wait_for(&mut cmd).map_err(ImageError::io("cannot run", &program))?;
    interrupt::check()?;
    if status.success() {
        Ok(())
    } else {
        Err(ImageError::Tool {
            what,
            status,
            hint: hint.to_string(),
        })
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::open(path).map_err(ImageError::io("cannot read", path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(ImageError::io("cannot read", path))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_inside_the_store() {
        for good in ["deb", "bookworm-git", "a.b_c-1", "9", "debian:bookworm"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "-x",
            "a b",
            &"x".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn metadata_round_trips_through_json() {
        let meta = ImageMeta {
            version: META_VERSION,
            name: "deb".into(),
            source: Source::Debootstrap {
                suite: "bookworm".into(),
                mirror: "http://deb.debian.org/debian".into(),
                packages: vec!["git".into()],
            },
            created_unix: 1_700_000_000,
            size_bytes: 1 << 20,
            content_bytes: 1000,
            sha256: "ab".into(),
            agent_sha256: "cd".into(),
        };
        let json = serde_json::to_string(&meta).unwrap();
        assert!(json.contains(r#""kind":"debootstrap""#), "{json}");
        assert_eq!(serde_json::from_str::<ImageMeta>(&json).unwrap(), meta);
        assert_eq!(meta.source.summary(), "debian bookworm +git");
    }
}
