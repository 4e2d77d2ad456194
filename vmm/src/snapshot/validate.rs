//! What a restore checks in a decoded `state` before it uses any of it: the checksum only
//! says the file is intact, not that whoever wrote it meant well.
//!
//! - [`check_state`]: every count and size against this kiln's limits (vCPUs, memory,
//!   devices, queues, MSRs, CPUID entries, …) and the parts agreeing with each other. Pure:
//!   no files, no KVM (the `snapshot_state` fuzz target runs it).
//! - [`confine_paths`]: every host path the state names must lie in the snapshot's own
//!   directory, the image store, or be given again on the command line; a writable raw
//!   disk is never restored (a snapshot never holds one).

use std::path::{Path, PathBuf};

use kiln_devices::virtio::block::BackendState;
use kiln_devices::virtio::{MmioTransportState, QueueSnapshot};

use super::SnapshotState;
use crate::config::{MAX_VCPUS, MIN_MEMORY_MIB};
use crate::device_manager::{DiskState, VirtioState, Windows, MAX_DEVICES};

/// Most guest memory a snapshot may claim, in MiB (1 TiB): far above any CI VM, and low
/// enough that every byte count computed from it fits a u64.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Most queues a saved virtio transport may hold (vsock has the most: 3).
const MAX_QUEUES: usize = 8;
/// Largest virtio queue (the virtio 1.x limit).
const MAX_QUEUE_SIZE: u16 = 32768;
/// Most CPUID entries and MSRs per vCPU (KVM's own limits for these lists).
const MAX_CPUID_ENTRIES: usize = 256;
const MAX_MSRS: usize = 256;

/// Why a decoded state cannot be restored (one line, said as what is wrong).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn bad(what: impl Into<String>) -> Invalid {
    Invalid(what.into())
}

/// Checks every count and size in `state` before a restore sizes anything by it.
pub fn check_state(state: &SnapshotState) -> Result<(), Invalid> {
    let machine = &state.machine;
    if machine.vcpus == 0 || machine.vcpus > MAX_VCPUS {
        return Err(bad(format!(
            "the snapshot's machine has {} vCPUs; kiln runs 1 to {MAX_VCPUS}",
            machine.vcpus
        )));
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&machine.memory_mib) {
        return Err(bad(format!(
            "the snapshot's machine has {} MiB of memory; kiln restores {MIN_MEMORY_MIB} to \
             {MAX_MEMORY_MIB} MiB",
            machine.memory_mib
        )));
    }
    if state.vcpus.len() != usize::from(machine.vcpus) {
        return Err(bad(format!(
            "the snapshot has {} vCPU states for {} vCPUs",
            state.vcpus.len(),
            machine.vcpus
        )));
    }
    let mut seen = [false; MAX_VCPUS as usize];
    for vcpu in &state.vcpus {
        let slot = seen
            .get_mut(usize::from(vcpu.index))
            .filter(|_| vcpu.index < machine.vcpus)
            .ok_or_else(|| bad(format!("vCPU state with index {}", vcpu.index)))?;
        if std::mem::replace(slot, true) {
            return Err(bad(format!("two vCPU states with index {}", vcpu.index)));
        }
        if vcpu.cpuid.len() > MAX_CPUID_ENTRIES || vcpu.msrs.len() > MAX_MSRS {
            return Err(bad(format!(
                "vCPU {}: {} CPUID entries and {} MSRs (at most {MAX_CPUID_ENTRIES} and \
                 {MAX_MSRS})",
                vcpu.index,
                vcpu.cpuid.len(),
                vcpu.msrs.len()
            )));
        }
        if vcpu.lapic.is_some() != machine.irqchip {
            return Err(bad(format!(
                "vCPU {}: local APIC state does not match the irqchip setting",
                vcpu.index
            )));
        }
    }
    if state.vm.is_some() != machine.irqchip {
        return Err(bad("irqchip state does not match the irqchip setting"));
    }
    check_devices(state)?;
    if let Some(diff) = &state.diff {
        if !diff.pages.fits(machine.memory_mib << 20) {
            return Err(bad("its diff page set does not match the guest's memory"));
        }
    }
    Ok(())
}

/// The devices: the serial FIFO within its size, each virtio device at a window kiln hands
/// out and at no other device's, at most one of each kind but disks, as many disks as a VM
/// takes, a vsock device exactly when the machine has a CID, and sane queues.
fn check_devices(state: &SnapshotState) -> Result<(), Invalid> {
    let devices = &state.devices;
    if devices.serial.in_buffer.len() > kiln_devices::SERIAL_FIFO_LEN {
        return Err(bad(format!(
            "serial input buffer of {} bytes (the FIFO holds {})",
            devices.serial.in_buffer.len(),
            kiln_devices::SERIAL_FIFO_LEN
        )));
    }
    if devices.virtio.len() > MAX_DEVICES {
        return Err(bad(format!(
            "{} virtio devices: a VM has at most {MAX_DEVICES}",
            devices.virtio.len()
        )));
    }
    let mut windows = Windows::default();
    for d in &devices.virtio {
        windows.claim(d.window).map_err(|e| bad(e.to_string()))?;
    }
    let count = |kind: &str| {
        devices
            .virtio
            .iter()
            .filter(|d| d.device.kind() == kind)
            .count()
    };
    for kind in ["vsock", "net", "rng"] {
        if count(kind) > 1 {
            return Err(bad(format!(
                "{} {kind} devices (a VM has at most one)",
                count(kind)
            )));
        }
    }
    if count("block") > crate::disk::MAX_DISKS {
        return Err(bad(format!(
            "{} disks: a VM takes at most {}",
            count("block"),
            crate::disk::MAX_DISKS
        )));
    }
    if devices.vsock().is_some() != state.machine.vsock_cid.is_some() {
        return Err(bad(
            "vsock device state does not match the machine's vsock CID",
        ));
    }
    let mut disk_index = 0;
    for d in &devices.virtio {
        let queues = match &d.device {
            VirtioState::Vsock(s) => &s.queues,
            VirtioState::Net(s) => &s.queues,
            VirtioState::Rng(s) => &s.queues,
            VirtioState::Block(disk) => {
                check_disk(disk_index, disk)?;
                disk_index += 1;
                &disk.device.queues
            }
        };
        let what = format!("{} device at {:#x}", d.device.kind(), d.window.base);
        check_transport(&what, &d.transport, queues)?;
    }
    Ok(())
}

/// A disk is a read-only raw image, or an overlay disk whose copy is a plain file name.
fn check_disk(index: usize, disk: &DiskState) -> Result<(), Invalid> {
    match (&disk.device.backend, &disk.overlay_file) {
        (
            BackendState::Raw {
                read_only: false, ..
            },
            _,
        ) => Err(bad(format!(
            "disk {index} is a writable raw image, which no snapshot holds"
        ))),
        (BackendState::Raw { .. }, None) => Ok(()),
        (BackendState::Overlay { .. }, Some(name))
            if kiln_devices::private::is_plain_name(name) && !name.starts_with('.') =>
        {
            Ok(())
        }
        (BackendState::Overlay { .. }, Some(name)) => {
            Err(bad(format!("disk {index}: bad overlay file name {name:?}")))
        }
        (BackendState::Overlay { .. }, None) => Err(bad(format!(
            "disk {index} is an overlay disk without a copy in the snapshot"
        ))),
        (BackendState::Raw { .. }, Some(_)) => Err(bad(format!(
            "disk {index} is a raw image with an overlay file"
        ))),
    }
}

/// A saved transport's and device's queues: few, of sizes a virtio queue can have.
fn check_transport(
    what: &str,
    transport: &MmioTransportState,
    device_queues: &[QueueSnapshot],
) -> Result<(), Invalid> {
    for queues in [&transport.queues[..], device_queues] {
        if queues.len() > MAX_QUEUES {
            return Err(bad(format!("{what}: {} queues", queues.len())));
        }
        for (i, q) in queues.iter().enumerate() {
            if q.max_size > MAX_QUEUE_SIZE || q.size > q.max_size {
                return Err(bad(format!(
                    "{what}: queue {i} of size {} (maximum {})",
                    q.size, q.max_size
                )));
            }
        }
    }
    Ok(())
}

/// Where a restore may take host files from.
#[derive(Debug, Clone, Default)]
pub struct PathRules {
    /// The image store (`--store`, `$KILN_IMAGE_STORE`, or the default), if it exists.
    pub store: Option<PathBuf>,
    /// Disk images given again on the command line: (disk index, path). These replace the
    /// state's path for that disk.
    pub disk_images: Vec<(usize, PathBuf)>,
}

/// Points every disk image of `state` at a trusted path: the one given for it in
/// `rules.disk_images`, else the state's own path if it resolves inside the snapshot
/// directory `dir` or the image store. A diff's parent must resolve inside the directory
/// that holds `dir` (snapshots of one chain sit side by side).
pub fn confine_paths(
    dir: &Path,
    state: &mut SnapshotState,
    rules: &PathRules,
) -> Result<(), Invalid> {
    let canonical = |p: &Path| std::fs::canonicalize(p);
    let dir = canonical(dir).map_err(|e| bad(format!("{}: {e}", dir.display())))?;
    let store = rules.store.as_deref().and_then(|s| canonical(s).ok());
    let disks = state.devices.disks().count();
    if let Some((index, _)) = rules.disk_images.iter().find(|(i, _)| *i >= disks) {
        return Err(bad(format!(
            "--disk-image {index}=…: the snapshot has {disks} disks"
        )));
    }
    for (index, disk) in state.devices.disks_mut().enumerate() {
        let image = match &mut disk.device.backend {
            BackendState::Raw { path, .. } => path,
            BackendState::Overlay { base, .. } => base,
        };
        if let Some((_, given)) = rules.disk_images.iter().find(|(i, _)| *i == index) {
            *image = given.clone();
            continue;
        }
        let resolved = canonical(image)
            .map_err(|e| bad(format!("disk {index}: image {}: {e}", image.display())))?;
        let inside =
            resolved.starts_with(&dir) || store.as_deref().is_some_and(|s| resolved.starts_with(s));
        if !inside {
            return Err(bad(format!(
                "disk {index}: image {} is outside the snapshot directory and the image \
                 store; if you trust it, give it again with --disk-image {index}=PATH",
                image.display()
            )));
        }
        *image = resolved;
    }
    if let Some(diff) = &mut state.diff {
        let family = dir.parent().unwrap_or(Path::new("/"));
        let parent = canonical(&diff.parent)
            .map_err(|e| bad(format!("diff parent {}: {e}", diff.parent.display())))?;
        if !parent.starts_with(family) || parent == dir {
            return Err(bad(format!(
                "diff parent {} is not a snapshot next to {} (a diff's parent must sit in \
                 the same directory)",
                diff.parent.display(),
                dir.display()
            )));
        }
        diff.parent = parent;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::device_manager::{MmioWindow, VirtioDeviceState};
    use crate::snapshot::{pages, DiffInfo, MachineInfo};

    /// A vCPU state with empty lists and zeroed registers (enough for these checks).
    pub(crate) fn zeroed_vcpu(index: u8) -> crate::vstate::vcpu_state::VcpuState {
        crate::vstate::vcpu_state::VcpuState {
            index,
            cpuid: Vec::new(),
            msrs: Vec::new(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: None,
            mp_state: Default::default(),
            vcpu_events: Default::default(),
        }
    }

    pub(crate) fn sample() -> SnapshotState {
        SnapshotState {
            machine: MachineInfo {
                vcpus: 1,
                memory_mib: 16,
                irqchip: false,
                vsock_cid: None,
            },
            vcpus: vec![zeroed_vcpu(0)],
            vm: None,
            devices: Default::default(),
            diff: None,
        }
    }

    fn refused(state: &SnapshotState) -> String {
        check_state(state).expect_err("a bad state was accepted").0
    }

    #[test]
    fn hostile_state_counts_and_sizes_are_refused() {
        check_state(&sample()).unwrap();

        let mut s = sample();
        s.machine.vcpus = 0;
        s.vcpus.clear();
        assert!(refused(&s).contains("0 vCPUs"));

        let mut s = sample();
        s.machine.vcpus = 200;
        assert!(refused(&s).contains("200 vCPUs"));

        for mib in [u64::MAX, (1 << 44) + 16, MAX_MEMORY_MIB + 1, 0, 1] {
            let mut s = sample();
            s.machine.memory_mib = mib;
            assert!(refused(&s).contains("MiB of memory"), "{mib}");
        }

        let mut s = sample();
        s.machine.vcpus = 2;
        assert!(refused(&s).contains("1 vCPU states for 2"));
        s.vcpus.push(zeroed_vcpu(0));
        assert!(refused(&s).contains("two vCPU states"));
        s.vcpus[1].index = 7;
        assert!(refused(&s).contains("index 7"));

        let mut s = sample();
        s.vcpus[0].msrs = vec![Default::default(); MAX_MSRS + 1];
        assert!(refused(&s).contains("MSRs"));

        let mut s = sample();
        s.machine.irqchip = true;
        assert!(refused(&s).contains("local APIC"));

        let mut s = sample();
        s.devices.serial.in_buffer = vec![0; 1 << 20];
        assert!(refused(&s).contains("serial input"));

        let mut s = sample();
        s.machine.vsock_cid = Some(3);
        assert!(refused(&s).contains("vsock"));

        let mut s = sample();
        s.diff = Some(DiffInfo {
            parent: PathBuf::from("/p"),
            parent_digest: [0; 32],
            pages: pages::PageSet::new(32 << 20),
        });
        assert!(refused(&s).contains("diff page set"));
    }

    #[test]
    fn devices_at_foreign_or_shared_windows_are_refused() {
        let disk = Path::new("/d.img");
        let mut s = sample();
        s.devices.virtio.push(raw_disk(disk));
        check_state(&s).unwrap();
        s.devices.virtio.push(raw_disk(disk));
        assert!(refused(&s).contains("two devices at MMIO window"));
        s.devices.virtio[1].window = MmioWindow::nth(1).unwrap();
        check_state(&s).unwrap();
        s.devices.virtio[1].window.base += 0x10;
        assert!(refused(&s).contains("not one kiln places devices at"));
        s.devices.virtio[1].window = MmioWindow {
            irq: 2,
            ..MmioWindow::nth(1).unwrap()
        };
        assert!(refused(&s).contains("IRQ 2"));
    }

    /// A read-only raw disk at `path`, as a snapshot records it, at the first window.
    fn raw_disk(path: &Path) -> VirtioDeviceState {
        use kiln_devices::virtio::block::{BlockConfigState, BlockState, SERIAL_LEN};
        VirtioDeviceState {
            window: MmioWindow::nth(0).unwrap(),
            transport: MmioTransportState::default(),
            device: VirtioState::Block(DiskState {
                device: BlockState {
                    version: kiln_devices::virtio::block::BLOCK_STATE_VERSION,
                    acked_features: 0,
                    config: BlockConfigState {
                        capacity: 0,
                        read_only: true,
                        device_features: 0,
                    },
                    serial: [0; SERIAL_LEN],
                    backend: BackendState::Raw {
                        path: path.to_owned(),
                        read_only: true,
                    },
                    queues: Vec::new(),
                },
                overlay_file: None,
                image_mtime: (0, 0),
            }),
        }
    }

    fn image_of(state: &SnapshotState) -> PathBuf {
        match &state.devices.disks().next().unwrap().device.backend {
            BackendState::Raw { path, .. } | BackendState::Overlay { base: path, .. } => {
                path.clone()
            }
        }
    }

    #[test]
    fn hostile_paths_outside_the_snapshot_and_the_store_are_refused() {
        let root = crate::test_util::scratch("confine");
        let (family, store, elsewhere) = (root.join("snaps"), root.join("store"), root.join("x"));
        let snap = family.join("snap");
        for d in [
            &snap,
            &family.join("parent"),
            &store.join("img"),
            &elsewhere,
        ] {
            std::fs::create_dir_all(d).unwrap();
        }
        for f in [
            snap.join("disk.img"),
            store.join("img/rootfs.ext4"),
            elsewhere.join("disk.img"),
        ] {
            std::fs::write(f, b"x").unwrap();
        }
        // A link inside the snapshot to a file outside it resolves outside: refused.
        std::os::unix::fs::symlink(elsewhere.join("disk.img"), snap.join("link.img")).unwrap();
        let rules = PathRules {
            store: Some(store.clone()),
            disk_images: Vec::new(),
        };
        let with_disk = |path: &Path| {
            let mut s = sample();
            s.devices.virtio.push(raw_disk(path));
            s
        };
        for ok in [snap.join("disk.img"), store.join("img/rootfs.ext4")] {
            let mut s = with_disk(&ok);
            confine_paths(&snap, &mut s, &rules).unwrap();
            assert_eq!(image_of(&s), std::fs::canonicalize(&ok).unwrap());
        }
        for bad in [
            PathBuf::from("/etc/shadow"),
            elsewhere.join("disk.img"),
            snap.join("link.img"),
            snap.join("../../x/disk.img"),
        ] {
            let e = confine_paths(&snap, &mut with_disk(&bad), &rules).unwrap_err();
            assert!(
                e.0.contains("outside the snapshot directory"),
                "{bad:?}: {e}"
            );
        }
        // Given again on the command line, it is used (in place of the state's path).
        let given = PathRules {
            disk_images: vec![(0, elsewhere.join("disk.img"))],
            ..rules.clone()
        };
        let mut s = with_disk(Path::new("/etc/shadow"));
        confine_paths(&snap, &mut s, &given).unwrap();
        assert_eq!(image_of(&s), elsewhere.join("disk.img"));
        let too_many = PathRules {
            disk_images: vec![(3, elsewhere.join("disk.img"))],
            ..rules.clone()
        };
        assert!(confine_paths(&snap, &mut sample(), &too_many).is_err());

        // A diff's parent sits beside the snapshot.
        let with_parent = |parent: &Path| {
            let mut s = sample();
            s.diff = Some(DiffInfo {
                parent: parent.to_owned(),
                parent_digest: [0; 32],
                pages: pages::PageSet::new(16 << 20),
            });
            s
        };
        confine_paths(&snap, &mut with_parent(&family.join("parent")), &rules).unwrap();
        for bad in [elsewhere.clone(), snap.clone(), PathBuf::from("/etc")] {
            let e = confine_paths(&snap, &mut with_parent(&bad), &rules).unwrap_err();
            assert!(e.0.contains("diff parent"), "{bad:?}: {e}");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
