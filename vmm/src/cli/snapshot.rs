//! The command-line arguments of the snapshot commands: `kiln ctl`, `kiln restore`,
//! `kiln fork`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{SlotArgs, ValueError};
use crate::config::SerialOutput;

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The VM's API socket (what `kiln run --api` or `kiln restore --api` was given).
    #[arg(long, value_name = "PATH")]
    pub api: PathBuf,
    /// Give up if the VM has not answered after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub timeout: u64,
    #[command(subcommand)]
    pub request: CtlRequest,
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum CtlRequest {
    /// Stop the vCPUs where they are.
    Pause,
    /// Let paused vCPUs run again.
    Resume,
    /// Print whether the VM runs or is paused, its vCPUs, memory and boot time.
    Status,
    /// Stop the VM; `kiln run` then exits 0.
    Shutdown,
    /// Write a snapshot of the VM into a directory, pausing it meanwhile.
    Snapshot {
        /// The directory (created if needed; must not hold a snapshot already). A
        /// relative path is taken from this command's working directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Leave the VM paused after the snapshot (default: it resumes).
        #[arg(long)]
        no_resume: bool,
        /// Write only the pages changed since the VM's previous snapshot (or the one it
        /// was restored from); a restore layers it over that one. Needs a VM started with
        /// --track-dirty-pages.
        #[arg(long)]
        diff: bool,
    },
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The snapshot directory (holding `state` and `memory`).
    #[arg(long, value_name = "DIR")]
    pub snapshot: PathBuf,
    /// Serve the control API on this Unix socket (as `kiln run --api`).
    #[arg(long, value_name = "PATH")]
    pub api: Option<PathBuf>,
    /// Open the API and vsock sockets to this group (name or number): mode 0660 with that
    /// group, instead of 0600 (this user and root only). Default: $KILN_SOCKET_GROUP.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// The host side of the restored VM's vsock device: required if the snapshot has one,
    /// and must not exist yet (each clone needs its own).
    #[arg(long, value_name = "PATH")]
    pub vsock: Option<PathBuf>,
    /// Where the serial console goes: `stdout`, `null` or a file path (appended).
    #[arg(long, value_name = "stdout|null|PATH", default_value = "stdout")]
    pub serial: SerialOutput,
    /// Set the restored guest's hostname (with its clock and entropy, through the agent).
    /// `kiln fork` gives each clone its own.
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Log the pages the guest writes, so that `kiln ctl snapshot --diff` can write a diff
    /// over this snapshot.
    #[arg(long)]
    pub track_dirty_pages: bool,
    /// Do not confine kiln's threads with seccomp filters (for debugging a filter only).
    #[arg(long)]
    pub no_seccomp: bool,
    #[command(flatten)]
    pub slot: SlotArgs,
    /// Give disk N (0 = /dev/vda) of the snapshot this new overlay file (repeatable): the
    /// snapshot's copy of the disk's overlay is copied there and the clone writes to it.
    /// Default: a copy in a private runtime directory, removed when the VM ends. Clones of
    /// one snapshot never share a writable overlay.
    #[arg(long, value_name = "N=PATH", value_parser = parse_disk_overlay)]
    pub disk_overlay: Vec<(usize, PathBuf)>,
    #[command(flatten)]
    pub images: SnapshotImages,
    /// This clone's network device: tap=NAME[,mac=MAC] (required if the snapshot has one;
    /// each clone needs its own TAP). Default MAC: a new random one. The guest keeps the
    /// address it had (ip=, gw=, dns= are refused here).
    #[arg(long, value_name = "tap=NAME[,mac=MAC]", value_parser = parse_clone_net)]
    pub net: Option<crate::net::NetConfig>,
    /// Print a one-line JSON report on stdout when the VM ends (as `kiln run --json`).
    #[arg(long)]
    pub json: bool,
}

fn parse_clone_net(s: &str) -> Result<crate::net::NetConfig, ValueError> {
    let net: crate::net::NetConfig = s.parse()?;
    if net.ip.is_some() {
        return Err(ValueError::CloneAddress(s.into()));
    }
    Ok(net)
}

/// Where a restore may take the snapshot's disk images from.
#[derive(Args, Debug, Clone, Default)]
pub struct SnapshotImages {
    /// Use this file as disk N's image (its raw image, or its overlay's base), instead of
    /// the path the snapshot names (repeatable). Needed for an image that is neither in the
    /// snapshot directory nor in the image store: a restore takes no other host file a
    /// snapshot names. The image must still be unchanged since the snapshot.
    #[arg(long, value_name = "N=PATH", value_parser = parse_disk_overlay)]
    pub disk_image: Vec<(usize, PathBuf)>,
    /// The image store whose images a snapshot may name. Default: $KILN_IMAGE_STORE, else
    /// /var/lib/kiln/images.
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
}

impl SnapshotImages {
    /// The rules [`crate::snapshot::validate::confine_paths`] applies.
    pub fn rules(&self) -> crate::snapshot::validate::PathRules {
        let store = crate::image::store::Store::locate(self.store.as_deref());
        crate::snapshot::validate::PathRules {
            store: Some(store.dir().to_owned()),
            disk_images: self.disk_image.clone(),
        }
    }

    /// The same flags, for a `kiln restore` child.
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        for (n, path) in &self.disk_image {
            let mut a = std::ffi::OsString::from(format!("--disk-image={n}="));
            a.push(path);
            args.push(a);
        }
        if let Some(store) = &self.store {
            args.push("--store".into());
            args.push(store.into());
        }
        args
    }
}

fn parse_disk_overlay(s: &str) -> Result<(usize, PathBuf), ValueError> {
    let (n, path) = s
        .split_once('=')
        .filter(|(_, p)| !p.is_empty())
        .ok_or_else(|| ValueError::DiskPair(s.into()))?;
    let n = n.parse().map_err(|source| ValueError::DiskNumber {
        spec: s.into(),
        number: n.into(),
        source,
    })?;
    Ok((n, PathBuf::from(path)))
}

#[derive(Args, Debug)]
pub struct ForkArgs {
    /// The snapshot directory to clone.
    #[arg(long, value_name = "DIR")]
    pub snapshot: PathBuf,
    #[command(flatten)]
    pub images: SnapshotImages,
    /// How many clones to start (1 to 1024).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub count: u32,
    /// Clone i's vsock socket is P-i (required if the snapshot has a vsock device).
    #[arg(long, value_name = "P")]
    pub vsock_prefix: Option<String>,
    /// Clone i serves its control API on P-i.
    #[arg(long, value_name = "P")]
    pub api_prefix: Option<String>,
    /// Clone i's serial console is appended to the file P-i (default: discarded).
    #[arg(long, value_name = "P")]
    pub serial_prefix: Option<String>,
    /// Clone i's network device is on the existing TAP named by this pattern with {i}
    /// replaced by i (e.g. kiln{i}); each clone gets a new random MAC. Required if the
    /// snapshot has a network device.
    #[arg(long, value_name = "PATTERN")]
    pub net_tap: Option<String>,
}
