//! What a restore reads from a snapshot directory before [`crate::vmm::Vmm::create`] puts
//! the VM back together: the state, checked against the restore's arguments
//! ([`Snapshot::open`]), and guest memory mapped from the snapshot's file copy-on-write. A
//! diff snapshot's memory is its chain of parents down to a full snapshot, each diff's
//! pages mapped over the layers below.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{read_state_and_digest, SnapshotError, SnapshotState, MEMORY_FILE};
use crate::memory::GuestMemory;
use crate::vmm::{BootDoneHook, VmmError};
use crate::vstate::vm::Vm;

/// What a restore needs besides the snapshot: the paths that must differ per clone.
pub struct RestoreSpec {
    pub snapshot: PathBuf,
    pub console: Box<dyn Write + Send>,
    /// The vsock socket of this clone; required if the snapshot has a vsock device.
    pub vsock_uds: Option<PathBuf>,
    pub start: Instant,
    pub boot_done: Option<BootDoneHook>,
    /// Log dirty pages, so that the restored VM can take diff snapshots over this one.
    pub track_dirty_pages: bool,
    /// Confine the VMM's threads with seccomp once the VM runs.
    pub seccomp: bool,
    /// (disk index, new overlay file) for this clone's overlay disks; each gets a copy of
    /// the snapshot's overlay.
    pub disk_overlays: Vec<(usize, PathBuf)>,
    /// Where an overlay disk not in `disk_overlays` gets its copy (`disk-N.overlay`).
    pub disk_scratch: Option<PathBuf>,
    /// This clone's TAP (and MAC; default a new random one); required if the snapshot has
    /// a network device.
    pub net: Option<crate::net::NetConfig>,
    /// Where a snapshot the guest asks for goes (`kiln job --snapshot-at`), so that a job
    /// started from a snapshot can take the next one; `None`: such requests fail.
    pub snapshot_on_request: Option<PathBuf>,
    /// Where disk images may come from besides the snapshot directory (the image store,
    /// images given again); see [`super::validate::confine_paths`].
    pub paths: super::validate::PathRules,
}

impl RestoreSpec {
    /// A restore of `snapshot` with its console to `console`, and nothing else: no vsock
    /// socket, no dirty log, seccomp off (set it when the process runs only this VM),
    /// overlays copied nowhere. Change fields with struct update syntax.
    pub fn new(snapshot: impl Into<PathBuf>, console: Box<dyn Write + Send>) -> Self {
        RestoreSpec {
            snapshot: snapshot.into(),
            console,
            vsock_uds: None,
            start: Instant::now(),
            boot_done: None,
            track_dirty_pages: false,
            seccomp: false,
            disk_overlays: Vec::new(),
            disk_scratch: None,
            net: None,
            snapshot_on_request: None,
            paths: super::validate::PathRules::default(),
        }
    }
}

/// How many diffs deep a chain of snapshots may be.
const MAX_CHAIN: usize = 64;

pub(crate) fn restore_err(what: impl std::fmt::Display) -> VmmError {
    VmmError::Restore(what.to_string())
}

/// A snapshot read for a restore: its state, checked, with every host path it names
/// confined (see [`super::validate`]) and checked against the arguments of the restore.
pub struct Snapshot {
    pub dir: PathBuf,
    pub state: SnapshotState,
    /// The SHA-256 of the state, which a diff snapshot over this VM names.
    pub digest: [u8; 32],
}

impl Snapshot {
    /// Reads the snapshot `spec` restores and checks it against `spec`.
    pub fn open(spec: &RestoreSpec) -> Result<Snapshot, VmmError> {
        let (mut state, digest) = read_state_and_digest(&spec.snapshot)?;
        super::validate::confine_paths(&spec.snapshot, &mut state, &spec.paths)
            .map_err(restore_err)?;
        check_arguments(&state, spec)?;
        Ok(Snapshot {
            dir: spec.snapshot.clone(),
            state,
            digest,
        })
    }

    /// The guest memory, mapped copy-on-write (see [`restore_memory`]).
    pub fn memory(&self) -> Result<GuestMemory, VmmError> {
        restore_memory(&self.dir, &self.state)
    }

    /// Puts the irqchip, PIT and clock back as saved.
    pub fn restore_vm_state(&self, vm: &Vm) -> Result<(), VmmError> {
        let saved = self
            .state
            .vm
            .as_ref()
            .ok_or_else(|| restore_err("no irqchip state"))?;
        vm.restore_state(saved)
            .map_err(|e| restore_err(format!("irqchip/PIT/clock: {e}")))
    }
}

/// Why a snapshot cannot be restored as asked, or its memory cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("--disk-overlay {index}={}: the snapshot has no overlay disk {index} ({disks} disks)", path.display())]
    NoOverlayDisk {
        index: usize,
        path: PathBuf,
        disks: usize,
    },
    #[error("the snapshot has a vsock device: give this clone its own --vsock path")]
    NeedsVsock,
    #[error("--net tap={0}: the snapshot has no network device; leave --net out")]
    UnwantedNet(String),
    #[error("the snapshot has a network device: give this clone its own --net tap=NAME")]
    NeedsNet,
    #[error(transparent)]
    Memory(#[from] super::memory::MapError),
    #[error("diff snapshot {}: {source}", dir.display())]
    Diff {
        dir: PathBuf,
        source: super::memory::MapError,
    },
}

/// Every check of a snapshot against the arguments given to restore it, in one place: what
/// each clone must bring for the devices the snapshot has, and nothing for devices it
/// lacks.
fn check_arguments(state: &SnapshotState, spec: &RestoreSpec) -> Result<(), RestoreError> {
    let disks: Vec<_> = state.devices.disks().collect();
    if let Some((index, path)) = spec
        .disk_overlays
        .iter()
        .find(|(i, _)| disks.get(*i).is_none_or(|d| d.overlay_file.is_none()))
    {
        return Err(RestoreError::NoOverlayDisk {
            index: *index,
            path: path.clone(),
            disks: disks.len(),
        });
    }
    if state.devices.vsock().is_some() && spec.vsock_uds.is_none() {
        return Err(RestoreError::NeedsVsock);
    }
    match (state.devices.net(), &spec.net) {
        (None, Some(config)) => Err(RestoreError::UnwantedNet(config.tap.clone())),
        (Some(_), None) => Err(RestoreError::NeedsNet),
        _ => Ok(()),
    }
}

/// The guest memory of the snapshot in `dir` (whose state is `state`): its full base mapped
/// privately, then each diff above it laid over, lowest first. Every parent must still be
/// the snapshot the diff above it was taken over, for the same machine.
fn restore_memory(dir: &Path, state: &SnapshotState) -> Result<GuestMemory, VmmError> {
    // Checked against MAX_MEMORY_MIB when the state was read: this cannot wrap.
    let size = state.machine.memory_mib << 20;
    // Every parent down the chain sits beside `dir` (confine_paths checked the first).
    let family = std::fs::canonicalize(dir)
        .ok()
        .and_then(|d| d.parent().map(Path::to_owned))
        .ok_or_else(|| restore_err(format!("{} has no parent directory", dir.display())))?;
    let mut diffs = Vec::new();
    let (mut layer_dir, mut diff) = (dir.to_owned(), state.diff.clone());
    while let Some(info) = diff {
        if diffs.len() == MAX_CHAIN {
            return Err(restore_err(format!(
                "{} is more than {MAX_CHAIN} diffs above a full snapshot (or its parents form a loop)",
                dir.display()
            )));
        }
        if !std::fs::canonicalize(&info.parent).is_ok_and(|p| p.starts_with(&family)) {
            return Err(restore_err(format!(
                "diff snapshot {} layers over {}, which is not a snapshot beside it",
                layer_dir.display(),
                info.parent.display()
            )));
        }
        let (parent, digest) = read_state_and_digest(&info.parent).map_err(|e| {
            restore_err(format!(
                "diff snapshot {} layers over {}: {e}",
                layer_dir.display(),
                info.parent.display()
            ))
        })?;
        if digest != info.parent_digest {
            return Err(restore_err(format!(
                "diff snapshot {} layers over {}, which has changed since the diff was taken",
                layer_dir.display(),
                info.parent.display()
            )));
        }
        if parent.machine != state.machine {
            return Err(restore_err(format!(
                "diff snapshot {} layers over {}, a snapshot of a different machine",
                layer_dir.display(),
                info.parent.display()
            )));
        }
        let next = info.parent.clone();
        diffs.push((std::mem::replace(&mut layer_dir, next), info.pages));
        diff = parent.diff;
    }
    let base = open_memory(&layer_dir.join(MEMORY_FILE), size)?;
    let memory = super::memory::map_private(&base, size).map_err(RestoreError::from)?;
    for (diff_dir, pages) in diffs.iter().rev() {
        let file = open_memory(&diff_dir.join(MEMORY_FILE), size)?;
        super::memory::overlay(&memory, size, &file, pages).map_err(|source| {
            RestoreError::Diff {
                dir: diff_dir.clone(),
                source,
            }
        })?;
    }
    // Building the memory is not a write the next diff snapshot should carry.
    super::memory::reset_bitmaps(&memory);
    Ok(memory)
}

/// Opens the memory file read-only and checks it holds exactly the guest's RAM.
fn open_memory(path: &Path, size: u64) -> Result<File, VmmError> {
    let file = kiln_devices::private::open_nofollow(path).map_err(|source| SnapshotError::Io {
        what: "open snapshot memory",
        path: path.to_owned(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| SnapshotError::Io {
            what: "stat",
            path: path.to_owned(),
            source,
        })?
        .len();
    if len != size {
        return Err(SnapshotError::Corrupt {
            path: path.to_owned(),
            why: format!("{len} bytes, the snapshot's guest has {size} bytes of memory"),
        }
        .into());
    }
    Ok(file)
}
