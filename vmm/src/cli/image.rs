//! `kiln image …`: the image store's commands.

use std::path::PathBuf;

use clap::{Args, Subcommand};

/// Make, list and remove root-disk images in the local image store.
///
/// The store is a directory (--store DIR, else $KILN_IMAGE_STORE, else
/// /var/lib/kiln/images) with one directory per image: `rootfs.ext4` (the root disk) and
/// `image.json` (name, source, created, size, SHA-256). `kiln run|job --image NAME` boots
/// one, with its own copy-on-write overlay under `kiln job`.
#[derive(Args, Debug)]
pub struct ImageArgs {
    #[command(subcommand)]
    pub command: ImageCommand,
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Build a Debian image with debootstrap (variant minbase, plus --packages) and the
    /// static kiln agent as /sbin/kiln-agent, its init. Needs root and debootstrap.
    ///
    /// The package cache and indexes, documentation, manual pages and translations are
    /// left out. The build happens in a staging directory of the store and is renamed
    /// into place when complete: a failed build leaves nothing behind.
    Build(BuildArgs),
    /// Make an image from a tarball of a filesystem (what `docker export` writes; gzip,
    /// xz or zstd compressed is fine), a `docker save` archive or an OCI image layout
    /// directory (their layers applied in order), adding the static kiln agent as
    /// /sbin/kiln-agent. Needs root, to keep the archive's owners and device nodes.
    Import(ImportArgs),
    /// Pull an OCI or Docker image from a registry and make it a root disk: its layers
    /// applied in order (whiteouts and opaque directories honoured, owners, modes, xattrs
    /// and hard links kept), the static kiln agent added as /sbin/kiln-agent. Needs root.
    ///
    /// Credentials come from $DOCKER_AUTH_CONFIG (config.json text), else
    /// $DOCKER_CONFIG/config.json, else ~/.docker/config.json; without, the pull is
    /// anonymous. A digest the store already has costs only the manifest request.
    Pull(PullArgs),
    /// List the images in the store.
    Ls(LsArgs),
    /// Remove an image from the store.
    Rm(RmArgs),
    /// Check that images' ext4 files still have the SHA-256 their image.json records
    /// (reads each file whole). Exits 1 if any does not, naming it.
    Verify(VerifyArgs),
}

/// Where the store is: shared by every image command.
#[derive(Args, Debug, Clone, Default)]
pub struct StoreArg {
    /// The image store directory. Default: $KILN_IMAGE_STORE, else /var/lib/kiln/images.
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
}

/// What goes into every new image's root disk besides the files: shared by the builders
/// and `pull`.
#[derive(Args, Debug)]
pub struct RootfsArgs {
    /// The filesystem's size in MiB. Default: what the files need plus 15 % and 32 MiB.
    #[arg(long, value_name = "MIB")]
    pub size: Option<u64>,
    /// The static guest agent to install. Default: $KILN_AGENT, else `kiln-agent` beside
    /// this `kiln`.
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
}

/// What both builders take besides their source.
#[derive(Args, Debug)]
pub struct MakeArgs {
    /// The image's name in the store (letters, digits, `-`, `_`, `.`, `:`).
    #[arg(long, value_name = "NAME")]
    pub name: String,
    #[command(flatten)]
    pub rootfs: RootfsArgs,
    /// Replace an image of the same name (only once the new one is complete).
    #[arg(long)]
    pub force: bool,
    /// Print the new image's metadata as one JSON line on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArg,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    #[command(flatten)]
    pub make: MakeArgs,
    /// The Debian suite (release) to bootstrap.
    #[arg(long, value_name = "SUITE", default_value = "bookworm")]
    pub debian: String,
    /// Packages to add, comma-separated (e.g. bash,git,ca-certificates).
    #[arg(long, value_name = "P1,P2,…", value_delimiter = ',')]
    pub packages: Vec<String>,
    /// The Debian mirror.
    #[arg(long, value_name = "URL", default_value = crate::image::build::DEFAULT_MIRROR)]
    pub mirror: String,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    #[command(flatten)]
    pub make: MakeArgs,
    /// The tarball, `docker save` archive or OCI layout directory.
    #[arg(value_name = "ROOTFS.TAR|IMAGE.TAR|OCI-DIR")]
    pub tarball: PathBuf,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// The image: [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST] (Docker Hub without a
    /// registry), e.g. debian:bookworm or registry.example:5000/ci/build@sha256:….
    #[arg(value_name = "REF")]
    pub reference: String,
    /// The image's name in the store. Default: the repository's last part and the tag
    /// (debian:bookworm), or the digest's first 12 digits without a tag.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Which image of a multi-platform index to take.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]", default_value = "linux/amd64")]
    pub platform: String,
    /// Speak plain HTTP (not HTTPS) to this registry; repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registry: Vec<String>,
    #[command(flatten)]
    pub rootfs: RootfsArgs,
    /// Replace an image of the same name made from something else (only once the new one
    /// is complete).
    #[arg(long)]
    pub force: bool,
    /// Print the image's metadata (with "digest" and "fetched") as one JSON line on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArg,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// One JSON array of the images' metadata (each with its "path") instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArg,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The images to check. Default: every image in the store.
    #[arg(value_name = "NAME")]
    pub names: Vec<String>,
    #[command(flatten)]
    pub store: StoreArg,
}

#[derive(Args, Debug)]
pub struct RmArgs {
    /// The image to remove.
    #[arg(value_name = "NAME")]
    pub name: String,
    #[command(flatten)]
    pub store: StoreArg,
}
