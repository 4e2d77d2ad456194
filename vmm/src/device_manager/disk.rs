//! Block devices: made from a disk's configuration, saved with their overlay copied into
//! the snapshot, and restored for a clone over a copy of its own.

use std::path::{Path, PathBuf};

use kiln_devices::virtio::block::{BackendState, Block, BlockError, BlockState, Overlay, RawFile};
use kiln_devices::Persist;

use super::state::DiskState;
use super::DeviceError;
use crate::snapshot::{image_mtime, SnapshotError};

/// A virtio-blk device for `disk`: over a new copy-on-write overlay if it names one, else
/// over the image itself (opened read-only for `ro`).
pub fn block_device(disk: &crate::disk::DiskConfig) -> Result<Block, DeviceError> {
    let serial = disk
        .serial
        .clone()
        .unwrap_or_else(|| Block::default_serial(&disk.path));
    let device = match &disk.overlay {
        Some(overlay) => {
            let backend = Overlay::create(&disk.path, overlay).map_err(|e| match e {
                BlockError::Open { path, source } if &path == overlay => DeviceError::Virtio(
                    format!("cannot create overlay {}: {source}", path.display()),
                ),
                e => e.into(),
            })?;
            Block::new(backend, serial.as_bytes())?
        }
        None => Block::new(
            RawFile::open(&disk.path, disk.read_only)?,
            serial.as_bytes(),
        )?,
    };
    Ok(device)
}

/// The image a disk reads: the raw file, or an overlay's base.
fn image(state: &BlockState) -> &Path {
    match &state.backend {
        BackendState::Raw { path, .. } => path,
        BackendState::Overlay { base, .. } => base,
    }
}

/// Disk `index`'s state; an overlay is flushed and copied into `dir` as
/// `disk-N.overlay` (the VM is paused and the event loop, which runs every request, is
/// here, so file and bitmap agree). A writable raw image cannot be snapshotted: a clone
/// would write to the same file as the original.
pub fn save(device: &mut Block, index: usize, dir: &Path) -> Result<DiskState, SnapshotError> {
    let mut state = device.save();
    let overlay_file = match &mut state.backend {
        BackendState::Raw {
            read_only: true, ..
        } => None,
        BackendState::Raw { path, .. } => {
            return Err(SnapshotError::NotSnapshottable(format!(
                "disk {index} ({}) is a writable raw image, which clones would share; \
                 attach it with `ro` or `overlay=` to snapshot the VM",
                path.display()
            )))
        }
        BackendState::Overlay { overlay, .. } => {
            device.flush().map_err(|source| SnapshotError::Io {
                what: "flush disk overlay",
                path: overlay.clone(),
                source,
            })?;
            let name = format!("disk-{index}.overlay");
            let copy = dir.join(&name);
            // No state file here (the caller checked): a copy left by a failed attempt.
            let _ = std::fs::remove_file(&copy);
            crate::disk::sparse_copy(overlay, &copy).map_err(|source| SnapshotError::Io {
                what: "copy the disk overlay to",
                path: copy.clone(),
                source,
            })?;
            *overlay = PathBuf::from(&name);
            Some(name)
        }
    };
    let image_mtime = image_mtime(image(&state)).map_err(|source| SnapshotError::Io {
        what: "stat disk image",
        path: image(&state).to_owned(),
        source,
    })?;
    Ok(DiskState {
        device: state,
        overlay_file,
        image_mtime,
    })
}

/// Where a restored clone's overlay disks get their own copies.
pub struct CloneOverlays<'a> {
    /// The snapshot directory the saved overlays are in.
    pub snapshot: &'a Path,
    /// (disk index, new overlay file) given for this clone.
    pub given: &'a [(usize, PathBuf)],
    /// Where an overlay disk not in `given` gets its copy (`disk-N.overlay`).
    pub scratch: Option<&'a Path>,
}

/// Disk `index`'s state for this clone: an overlay disk gets a fresh copy of the
/// snapshot's overlay (where `overlays.given` says, else in the scratch directory), so that
/// clones never share a writable file and the snapshot is never written.
pub fn clone_state(
    overlays: &CloneOverlays,
    index: usize,
    saved: &DiskState,
) -> Result<BlockState, DeviceError> {
    let restore_err = |why: String| DeviceError::Restore(why);
    let mut state = saved.device.clone();
    let now = image_mtime(image(&state)).map_err(|e| {
        restore_err(format!(
            "disk {index}: image {}: {e}",
            image(&state).display()
        ))
    })?;
    if now != saved.image_mtime {
        return Err(restore_err(format!(
            "disk {index}: image {} was modified after the snapshot was taken; a restore \
             needs the image as it was",
            image(&state).display()
        )));
    }
    let BackendState::Overlay { overlay, .. } = &mut state.backend else {
        return Ok(state);
    };
    let Some(name) = &saved.overlay_file else {
        return Err(restore_err(format!(
            "disk {index} is an overlay disk without a copy in the snapshot"
        )));
    };
    if name.contains('/') || name.starts_with('.') {
        return Err(restore_err(format!(
            "disk {index}: bad overlay file name {name:?}"
        )));
    }
    let target = match overlays.given.iter().find(|(i, _)| *i == index) {
        Some((_, path)) => path.clone(),
        None => overlays
            .scratch
            .ok_or_else(|| {
                restore_err(format!(
                    "disk {index} has an overlay: give this clone its own (--disk-overlay {index}=PATH)"
                ))
            })?
            .join(format!("disk-{index}.overlay")),
    };
    crate::disk::check_overlay_path(&target).map_err(|e| restore_err(e.to_string()))?;
    let source = overlays.snapshot.join(name);
    crate::disk::sparse_copy(&source, &target).map_err(|e| {
        restore_err(format!(
            "cannot copy disk {index}'s overlay {} to {}: {e}",
            source.display(),
            target.display()
        ))
    })?;
    *overlay = target;
    Ok(state)
}
