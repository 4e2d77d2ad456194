//! `Vmm::restore`: a VM rebuilt from a snapshot directory, its memory mapped from the
//! snapshot's file copy-on-write. A diff snapshot's memory is its chain of parents down to
//! a full snapshot, each diff's pages mapped over the layers below.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{read_state_and_digest, SnapshotError, SnapshotRef, SnapshotState, MEMORY_FILE};
use crate::devices::{self, Buses, DeviceError};
use crate::memory::GuestMemory;
use crate::vmm::{control_channel, BootDoneHook, Subscriber, VirtioParts, Vmm, VmmError};
use crate::vstate::vcpu::Vcpu;
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

fn restore_err(what: impl std::fmt::Display) -> VmmError {
    VmmError::Restore(what.to_string())
}

impl Vmm {
    /// Rebuilds the VM saved in `spec.snapshot`, ready to [`Vmm::run`] from where it was.
    /// Nothing in the snapshot directory is written.
    pub fn restore(spec: RestoreSpec) -> Result<Vmm, VmmError> {
        let (mut state, digest) = read_state_and_digest(&spec.snapshot)?;
        super::validate::confine_paths(&spec.snapshot, &mut state, &spec.paths)
            .map_err(restore_err)?;
        if let Some((index, path)) = spec
            .disk_overlays
            .iter()
            .find(|(i, _)| state.disks.get(*i).is_none_or(|d| d.overlay_file.is_none()))
        {
            return Err(restore_err(format!(
                "--disk-overlay {index}={}: the snapshot has no overlay disk {index} ({} disks)",
                path.display(),
                state.disks.len()
            )));
        }
        let machine = state.machine.clone();
        let memory = restore_memory(&spec.snapshot, &state)?;
        if state.vcpus.len() != usize::from(machine.vcpus) {
            return Err(restore_err(format!(
                "the snapshot has {} vCPU states for {} vCPUs",
                state.vcpus.len(),
                machine.vcpus
            )));
        }

        let vm = Vm::new(&memory, machine.vcpus, spec.track_dirty_pages)?;
        if machine.irqchip {
            vm.create_irqchip()?;
            let vm_state = state
                .vm
                .as_ref()
                .ok_or_else(|| restore_err("no irqchip state"))?;
            vm.restore_state(vm_state)
                .map_err(|e| restore_err(format!("irqchip/PIT/clock: {e}")))?;
        }
        let mut buses = Buses::default();
        let legacy = devices::attach_legacy(
            &vm,
            &mut buses,
            spec.console,
            spec.start,
            machine.irqchip,
            Some((&state.serial, state.i8042)),
        )?;
        let mut subscribers: Vec<Subscriber> = Vec::new();
        let mut vsock = None;
        let mut virtio = devices::VirtioAllocator::default();
        if let Some(saved) = &state.vsock {
            let uds = spec.vsock_uds.as_deref().ok_or_else(|| {
                restore_err("the snapshot has a vsock device: give this clone its own --vsock path")
            })?;
            let (slot, device) =
                virtio.attach_restored_vsock(&vm, &mut buses, &memory, uds, saved)?;
            vsock = Some(VirtioParts::subscribed(
                device,
                slot.transport,
                &mut subscribers,
            ));
        }

        let mut disks = Vec::with_capacity(state.disks.len());
        for (index, saved) in state.disks.iter().enumerate() {
            let device_state = clone_disk_state(
                &spec.snapshot,
                &spec.disk_overlays,
                spec.disk_scratch.as_deref(),
                index,
                saved,
            )?;
            let (slot, device) = virtio.attach_restored_block(
                &vm,
                &mut buses,
                &memory,
                &device_state,
                &saved.transport,
            )?;
            disks.push(VirtioParts::subscribed(
                device,
                slot.transport,
                &mut subscribers,
            ));
        }

        let mut net = None;
        if let (None, Some(config)) = (&state.net, &spec.net) {
            return Err(restore_err(format!(
                "--net tap={}: the snapshot has no network device; leave --net out",
                config.tap
            )));
        }
        if let Some(saved) = &state.net {
            let config = spec.net.as_ref().ok_or_else(|| {
                restore_err(
                    "the snapshot has a network device: give this clone its own --net tap=NAME",
                )
            })?;
            let (slot, device) =
                virtio.attach_restored_net(&vm, &mut buses, &memory, config, saved)?;
            net = Some(VirtioParts::subscribed(
                device,
                slot.transport,
                &mut subscribers,
            ));
        }

        let mut rng = None;
        if let Some(saved) = &state.rng {
            let (slot, device) = virtio.attach_restored_rng(&vm, &mut buses, &memory, saved)?;
            rng = Some(VirtioParts::subscribed(
                device,
                slot.transport,
                &mut subscribers,
            ));
        }

        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        for saved in &state.vcpus {
            let vcpu = Vcpu::new(&vm, saved.index)?;
            vcpu.restore(saved).map_err(restore_err)?;
            vcpus.push(vcpu);
        }
        if let Some(parts) = &vsock {
            // Connections did not survive: tell the guest so it drops its ends.
            if let Ok(mut device) = parts.device.lock() {
                if let Err(e) = device.send_transport_reset() {
                    tracing::debug!("vsock transport reset not sent: {e}");
                }
            }
        }
        let msr_indices: Vec<u32> = state.vcpus[0].msrs.iter().map(|m| m.index).collect();
        let (controller, control) = control_channel().map_err(DeviceError::EventFd)?;
        Ok(Vmm {
            vcpus,
            buses: Arc::new(buses),
            legacy,
            vsock,
            disks,
            net,
            rng,
            subscribers,
            boot_done: spec.boot_done,
            stop_evt: EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?,
            controller,
            control,
            start: spec.start,
            machine,
            msr_indices: Arc::new(msr_indices),
            memory,
            vm,
            dirty_log: spec.track_dirty_pages,
            diff_base: Some(SnapshotRef {
                dir: std::path::absolute(&spec.snapshot).map_err(restore_err)?,
                digest,
            }),
            snapshot_on_request: spec.snapshot_on_request,
            seccomp: spec.seccomp,
            phases: crate::vmm::Phases::default(),
        })
    }
}

/// Disk `index`'s state for this clone: an overlay disk gets a fresh copy of the
/// snapshot's overlay (where `--disk-overlay` says, else in the scratch directory), so that
/// clones never share a writable file and the snapshot is never written.
fn clone_disk_state(
    snapshot: &Path,
    disk_overlays: &[(usize, PathBuf)],
    disk_scratch: Option<&Path>,
    index: usize,
    saved: &super::DiskSnapshot,
) -> Result<kiln_devices::virtio::block::BlockState, VmmError> {
    use kiln_devices::virtio::block::BackendState;
    let mut state = saved.device.clone();
    let image = match &state.backend {
        BackendState::Raw { path, .. } => path,
        BackendState::Overlay { base, .. } => base,
    };
    let now = super::image_mtime(image)
        .map_err(|e| restore_err(format!("disk {index}: image {}: {e}", image.display())))?;
    if now != saved.image_mtime {
        return Err(restore_err(format!(
            "disk {index}: image {} was modified after the snapshot was taken; a restore \
             needs the image as it was",
            image.display()
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
    let target = match disk_overlays.iter().find(|(i, _)| *i == index) {
        Some((_, path)) => path.clone(),
        None => disk_scratch
            .ok_or_else(|| {
                restore_err(format!(
                    "disk {index} has an overlay: give this clone its own (--disk-overlay {index}=PATH)"
                ))
            })?
            .join(format!("disk-{index}.overlay")),
    };
    crate::disk::check_overlay_path(&target).map_err(restore_err)?;
    let source = snapshot.join(name);
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
    let memory = super::memory::map_private(&base, size).map_err(restore_err)?;
    for (diff_dir, pages) in diffs.iter().rev() {
        let file = open_memory(&diff_dir.join(MEMORY_FILE), size)?;
        super::memory::overlay(&memory, size, &file, pages)
            .map_err(|e| restore_err(format!("diff snapshot {}: {e}", diff_dir.display())))?;
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
