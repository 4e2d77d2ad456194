//! [`Vmm::create`]: the one way a VM is put together, whether it boots from a
//! [`MachineSpec`] or resumes from a snapshot ([`RestoreSpec`]). The steps are the same —
//! memory, the KVM VM and irqchip, devices, what the guest runs, vCPUs — and each says in
//! one place how a new VM and a restored one differ.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{control_channel, BootDoneHook, BootSource, MachineSpec, Phases, Vmm, VmmError};
use crate::arch::x86_64::{acpi, mptable, regs, regs::CpuMode};
use crate::boot;
use crate::device_manager::{
    block_device, CloneOverlays, CloneResources, DeviceError, DeviceManager, VirtioHandle,
};
use crate::memory::{self, GuestMemory};
use crate::snapshot::restore::{self, RestoreSpec, Snapshot};
use crate::snapshot::{MachineInfo, SnapshotRef};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;

/// How a VM starts.
pub enum Start {
    /// Booted from scratch.
    Boot(MachineSpec),
    /// Resumed from a snapshot, where it was.
    Restore(RestoreSpec),
}

/// What a booted and a restored VM are both given.
struct Common {
    console: Box<dyn Write + Send>,
    start: Instant,
    boot_done: Option<BootDoneHook>,
    track_dirty_pages: bool,
    seccomp: bool,
    snapshot_on_request: Option<PathBuf>,
}

/// The [`Common`] fields of a [`MachineSpec`] or a [`RestoreSpec`], which name them alike.
macro_rules! common {
    ($spec:ident) => {
        Common {
            console: $spec.console,
            start: $spec.start,
            boot_done: $spec.boot_done,
            track_dirty_pages: $spec.track_dirty_pages,
            seccomp: $spec.seccomp,
            snapshot_on_request: $spec.snapshot_on_request,
        }
    };
}

impl Vmm {
    /// Creates memory, the VM, its devices and vCPUs, and loads what the guest boots.
    pub fn build(spec: MachineSpec) -> Result<Self, VmmError> {
        Self::create(Start::Boot(spec))
    }

    /// Rebuilds the VM saved in `spec.snapshot`, ready to [`Vmm::run`] from where it was.
    /// Nothing in the snapshot directory is written.
    pub fn restore(spec: RestoreSpec) -> Result<Self, VmmError> {
        Self::create(Start::Restore(spec))
    }

    /// Puts a VM together, new or from a snapshot.
    pub fn create(how: Start) -> Result<Self, VmmError> {
        let mut phases = Phases::default();
        phases.mark("cli_and_config");
        let (plan, common) = match how {
            Start::Boot(spec) => {
                let common = common!(spec);
                let boot = Boot {
                    machine: MachineInfo {
                        vcpus: spec.vcpus,
                        memory_mib: spec.memory_mib,
                        irqchip: spec.irqchip,
                        vsock_cid: spec.vsock.as_ref().map(|v| v.cid),
                    },
                    source: spec.boot,
                    extra_mmio: spec.extra_mmio,
                    vsock: spec.vsock,
                    disks: spec.disks,
                    net: spec.net,
                    rng: spec.rng,
                };
                (Plan::Boot(boot), common)
            }
            Start::Restore(spec) => {
                let snapshot = Snapshot::open(&spec)?;
                phases.mark("snapshot_open");
                let common = common!(spec);
                let clone = CloneArgs {
                    vsock_uds: spec.vsock_uds,
                    net: spec.net,
                    disk_overlays: spec.disk_overlays,
                    disk_scratch: spec.disk_scratch,
                };
                (Plan::Restore(Box::new(snapshot), clone), common)
            }
        };
        let machine = match &plan {
            Plan::Boot(boot) => boot.machine.clone(),
            Plan::Restore(snapshot, _) => snapshot.state.machine.clone(),
        };
        let snapshot = match &plan {
            Plan::Boot(_) => None,
            Plan::Restore(snapshot, _) => Some(snapshot.as_ref()),
        };

        let diff_base = snapshot
            .map(|s| -> Result<SnapshotRef, VmmError> {
                Ok(SnapshotRef {
                    dir: std::path::absolute(&s.dir).map_err(restore::restore_err)?,
                    digest: s.digest,
                })
            })
            .transpose()?;
        let restored = snapshot.is_some();

        // Guest memory: new and zeroed, or the snapshot's mapped copy-on-write.
        let memory = match snapshot {
            None => memory::create(machine.memory_mib << 20)?,
            Some(snapshot) => snapshot.memory()?,
        };
        phases.mark("guest_memory");

        let vm = Vm::new(&memory, machine.vcpus, common.track_dirty_pages)?;
        if machine.irqchip {
            vm.create_irqchip()?;
            if let Some(snapshot) = snapshot {
                snapshot.restore_vm_state(&vm)?;
            }
        }
        phases.mark("kvm_vm_and_irqchip");

        let mut devices = DeviceManager::new(
            &vm,
            common.console,
            common.start,
            machine.irqchip,
            snapshot.map(|s| &s.state.devices),
        )?;
        let mut vcpus = Vec::with_capacity(usize::from(machine.vcpus));
        let msr_indices = match plan {
            Plan::Boot(boot) => {
                let (entry, mode) =
                    boot.attach_and_load(&vm, &memory, &mut devices, &mut phases)?;
                for index in 0..machine.vcpus {
                    let vcpu = Vcpu::new(&vm, index)?;
                    vcpu.configure(&vm, machine.vcpus, entry, mode)?;
                    if machine.irqchip {
                        vcpu.configure_lapic()?;
                    }
                    vcpus.push(vcpu);
                }
                vcpus
                    .first()
                    .map(|v| v.saveable_msrs(&vm.msr_index_list()))
                    .unwrap_or_default()
            }
            Plan::Restore(ref snapshot, ref clone) => {
                let resources = clone.resources(&snapshot.dir);
                devices.restore_virtio(&vm, &memory, &snapshot.state.devices, &resources)?;
                phases.mark("devices");
                for saved in &snapshot.state.vcpus {
                    let vcpu = Vcpu::new(&vm, saved.index)?;
                    vcpu.restore(saved).map_err(restore::restore_err)?;
                    vcpus.push(vcpu);
                }
                // check_state made sure there is a vCPU state.
                snapshot.state.vcpus[0]
                    .msrs
                    .iter()
                    .map(|m| m.index)
                    .collect()
            }
        };
        if restored {
            if let Some(vsock) = devices.vsock() {
                // Connections did not survive: tell the guest so it drops its ends.
                if let Ok(mut device) = vsock.lock() {
                    if let Err(e) = device.send_transport_reset() {
                        tracing::debug!("vsock transport reset not sent: {e}");
                    }
                }
            }
        }
        let (controller, control) = control_channel().map_err(DeviceError::EventFd)?;
        let (outcome_sender, outcomes) = channel();
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd);
        phases.mark("vcpus");
        Ok(Vmm {
            memory,
            vm,
            devices,
            machine,
            vcpus,
            msr_indices: Arc::new(msr_indices),
            handles: Vec::new(),
            exited: eventfd()?,
            outcomes,
            outcome_sender,
            halted: 0,
            exit: None,
            paused: None,
            stop_evt: eventfd()?,
            boot_done: common.boot_done,
            controller,
            control,
            dirty_log: common.track_dirty_pages,
            diff_base,
            snapshot_on_request: common.snapshot_on_request,
            start: common.start,
            phases,
            seccomp: common.seccomp,
        })
    }
}

/// A new VM, or a snapshot and what its clone brings.
enum Plan {
    Boot(Boot),
    Restore(Box<Snapshot>, CloneArgs),
}

fn shared<D>(device: D) -> Arc<Mutex<D>> {
    Arc::new(Mutex::new(device))
}

/// What a new VM is made of besides [`Common`].
struct Boot {
    machine: MachineInfo,
    source: BootSource,
    extra_mmio: Vec<(u64, u64, kiln_devices::SharedBusDevice)>,
    vsock: Option<super::VsockSpec>,
    disks: Vec<crate::disk::DiskConfig>,
    net: Option<crate::net::NetConfig>,
    rng: bool,
}

impl Boot {
    /// Attaches the new VM's devices (vsock, disks in order, network, entropy) and loads
    /// what the guest runs, telling a Linux guest where its devices are. Returns the entry
    /// point and CPU mode.
    fn attach_and_load(
        self,
        vm: &Vm,
        memory: &GuestMemory,
        devices: &mut DeviceManager,
        phases: &mut Phases,
    ) -> Result<(u64, CpuMode), VmmError> {
        for (base, len, dev) in self.extra_mmio {
            devices.add_mmio(base, len, dev)?;
        }
        // The virtio devices' `virtio_mmio.device=` fragments, in attach order, apart from
        // the rest of what the devices add to the command line.
        let mut announced = Vec::new();
        let mut cmdline = Vec::new();
        if let Some(vsock) = &self.vsock {
            let device = kiln_devices::virtio::vsock::Vsock::new(vsock.cid, &vsock.uds_path)
                .map_err(DeviceError::from)?;
            announced.push(devices.attach(vm, memory, VirtioHandle::Vsock(shared(device)))?);
        }
        for (index, disk) in self.disks.iter().enumerate() {
            let device = block_device(disk)?;
            announced.push(devices.attach(vm, memory, VirtioHandle::Block(shared(device)))?);
            if disk.root {
                cmdline.push(crate::disk::root_cmdline(index, disk.read_only));
            }
        }
        if let Some(config) = &self.net {
            let device = config.device().map_err(DeviceError::from)?;
            announced.push(devices.attach(vm, memory, VirtioHandle::Net(shared(device)))?);
            cmdline.extend(config.cmdline());
        }
        if self.rng {
            let device = kiln_devices::virtio::rng::Rng::new().map_err(DeviceError::from)?;
            announced.push(devices.attach(vm, memory, VirtioHandle::Rng(shared(device)))?);
        }
        phases.mark("devices");
        let loaded = match self.source {
            BootSource::Linux {
                kernel,
                initrd,
                cmdline: base,
                acpi,
                acpi_devices,
            } => {
                regs::write_boot_tables(memory)?;
                mptable::write(memory, self.machine.vcpus)?;
                let rsdp = if acpi {
                    Some(write_acpi(
                        memory,
                        self.machine.vcpus,
                        devices,
                        acpi_devices,
                    )?)
                } else {
                    None
                };
                // Each virtio device is announced one way only (the DSDT has them with
                // acpi_devices): a kernel that reads both would probe each device twice.
                if !acpi_devices {
                    cmdline.splice(0..0, announced);
                }
                let mut line = base;
                for fragment in &cmdline {
                    line.push(' ');
                    line.push_str(fragment);
                }
                let names_init = line.split_whitespace().any(|w| w.starts_with("init="));
                if self.disks.iter().any(|d| d.root) && initrd.is_none() && !names_init {
                    line.push_str(" init=");
                    line.push_str(crate::disk::ROOT_INIT);
                }
                let k = boot::load_linux(memory, &kernel, initrd.as_deref(), &line, rsdp)?;
                (k.entry.0, CpuMode::Long)
            }
            BootSource::Raw {
                code,
                load_addr,
                mode,
            } => {
                if mode == CpuMode::Long {
                    regs::write_boot_tables(memory)?;
                }
                memory
                    .write_slice(&code, GuestAddress(load_addr))
                    .map_err(|_| VmmError::RawTooLarge {
                        addr: load_addr,
                        size: code.len(),
                    })?;
                (load_addr, mode)
            }
        };
        phases.mark("kernel_load");
        Ok(loaded)
    }
}

/// Writes the ACPI tables of a new VM with `vcpus`, and with the virtio devices attached
/// so far if `with_virtio`. A restored VM never comes here: its tables are in the memory it
/// was saved with.
fn write_acpi(
    memory: &GuestMemory,
    vcpus: u8,
    devices: &DeviceManager,
    with_virtio: bool,
) -> Result<GuestAddress, VmmError> {
    let virtio: Vec<acpi::MmioDevice> = devices
        .windows()
        .into_iter()
        .filter(|_| with_virtio)
        .map(|(window, _)| acpi::MmioDevice {
            base: window.base,
            size: kiln_devices::virtio::mmio::MMIO_WINDOW_SIZE,
            irq: window.irq,
        })
        .collect();
    let serial_port = u16::try_from(kiln_devices::COM1_BASE).unwrap_or(0x3f8);
    let machine = acpi::Machine {
        vcpus,
        serial: (serial_port, kiln_devices::COM1_IRQ),
        virtio: &virtio,
    };
    Ok(acpi::write(memory, &machine)?)
}

/// What a restored clone brings that its snapshot cannot hold.
struct CloneArgs {
    vsock_uds: Option<PathBuf>,
    net: Option<crate::net::NetConfig>,
    disk_overlays: Vec<(usize, PathBuf)>,
    disk_scratch: Option<PathBuf>,
}

impl CloneArgs {
    fn resources<'a>(&'a self, snapshot: &'a std::path::Path) -> CloneResources<'a> {
        CloneResources {
            vsock_uds: self.vsock_uds.as_deref(),
            net: self.net.as_ref(),
            overlays: CloneOverlays {
                snapshot,
                given: &self.disk_overlays,
                scratch: self.disk_scratch.as_deref(),
            },
        }
    }
}
