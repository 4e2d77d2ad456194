//! One VM from build to exit: guest memory, the KVM VM, devices and vCPUs ([`Vmm::build`],
//! or [`Vmm::restore`] from a snapshot), then the vCPU threads and the main thread's event
//! loop ([`Vmm::run`], in `run.rs`), which handles control requests (`control.rs`) and
//! decides how the run ended (`core.rs`).

mod control;
mod core;
mod run;
mod snapshot;
mod spec;

pub use spec::{BootDoneHook, BootSource, MachineSpec, VsockSpec};

pub use control::{control_channel, ControlQueue, Controller, Request, Response};

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::MutEventSubscriber;
use kiln_devices::Persist;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::{mptable, regs, regs::CpuMode};
use crate::boot::{self, BootError};
use crate::devices::{self, Buses, DeviceError, LegacyDevices};
use crate::memory::{self, GuestMemory, MemoryError};
use crate::snapshot::{MachineInfo, SnapshotError, SnapshotRef};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("cannot write boot tables into guest memory: {0}")]
    BootTables(#[from] vm_memory::GuestMemoryError),
    #[error("guest code of {size} bytes at {addr:#x} does not fit in guest memory")]
    RawTooLarge { addr: u64, size: usize },
    #[error("event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot restore: {0}")]
    Restore(String),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest reset or powered off normally.
    Reset,
    /// Every vCPU executed HLT (only without an irqchip).
    Halted,
    /// The guest kernel panicked; the panic line from the console.
    Panic(String),
    /// KVM or a vCPU failed.
    Fault(String),
    /// The host stopped the VM (a [`StopHandle`], e.g. on SIGTERM).
    Stopped,
}

impl GuestExit {
    pub fn is_success(&self) -> bool {
        matches!(self, GuestExit::Reset | GuestExit::Halted)
    }
    /// A short word for reports: `reset`, `halted`, `panic`, `fault`.
    pub fn kind(&self) -> &'static str {
        match self {
            GuestExit::Reset => "reset",
            GuestExit::Halted => "halted",
            GuestExit::Panic(_) => "panic",
            GuestExit::Fault(_) => "fault",
            GuestExit::Stopped => "stopped",
        }
    }
}

/// The result of [`Vmm::run`].
#[derive(Debug, Clone)]
pub struct RunReport {
    pub exit: GuestExit,
    /// From `start` to the guest's boot-done mark, if it made one.
    pub boot_time: Option<Duration>,
    /// From `start` to the first KVM_RUN: the VMM's own set-up cost.
    pub setup_time: Option<Duration>,
    /// When each phase of the VMM's set-up ended, from `start`, in order (see
    /// [`Phases`]); the last is the first KVM_RUN.
    pub phases: Vec<(&'static str, Duration)>,
}

/// The VMM's set-up as a timeline: each named phase's end, from the process's start. Kept
/// so that a boot timeline shows where set-up time goes before the guest's first
/// instruction.
#[derive(Debug, Clone, Default)]
pub struct Phases(Vec<(&'static str, Instant)>);

impl Phases {
    /// Marks the end of phase `name` now.
    pub fn mark(&mut self, name: &'static str) {
        self.0.push((name, Instant::now()));
    }

    /// The phases' ends as durations since `start`.
    pub fn since(&self, start: Instant) -> Vec<(&'static str, Duration)> {
        self.0
            .iter()
            .map(|(name, at)| (*name, at.saturating_duration_since(start)))
            .collect()
    }
}

/// Stops a running VM: [`Vmm::run`] returns with [`GuestExit::Stopped`].
pub struct StopHandle(EventFd);

impl StopHandle {
    pub fn stop(&self) {
        if let Err(e) = self.0.write(1) {
            tracing::error!("cannot signal the VM to stop: {e}");
        }
    }
}

/// Something the main thread's event loop drives.
pub(crate) type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A built VM, ready to run.
pub struct Vmm {
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) buses: Arc<Buses>,
    pub(crate) legacy: LegacyDevices,
    pub(crate) vsock: Option<VsockParts>,
    /// The block devices, /dev/vda first.
    pub(crate) disks: Vec<BlockParts>,
    /// The network device.
    pub(crate) net: Option<NetParts>,
    /// The entropy device.
    pub(crate) rng: Option<RngParts>,
    /// Devices with file descriptors the event loop watches (vsock).
    pub(crate) subscribers: Vec<Subscriber>,
    pub(crate) boot_done: Option<BootDoneHook>,
    pub(crate) stop_evt: EventFd,
    pub(crate) controller: Controller,
    pub(crate) control: ControlQueue,
    pub(crate) start: Instant,
    pub(crate) machine: MachineInfo,
    /// MSRs a snapshot saves for each vCPU.
    pub(crate) msr_indices: Arc<Vec<u32>>,
    // The memory is kept alive for as long as the vCPUs run: KVM maps it into the guest.
    pub(crate) memory: GuestMemory,
    pub(crate) vm: Vm,
    /// Whether KVM logs dirty pages (diff snapshots need it).
    pub(crate) dirty_log: bool,
    /// The snapshot a diff snapshot would layer over: the last one taken, or the one this
    /// VM was restored from.
    pub(crate) diff_base: Option<SnapshotRef>,
    /// Whether [`Vmm::run`] confines its threads with seccomp.
    pub(crate) seccomp: bool,
    /// When each set-up phase ended.
    pub(crate) phases: Phases,
    pub(crate) snapshot_on_request: Option<PathBuf>,
}

/// A virtio device and its transport, for snapshots.
pub(crate) struct VirtioParts<D> {
    pub(crate) device: Arc<Mutex<D>>,
    pub(crate) transport: Arc<Mutex<kiln_devices::virtio::MmioTransport>>,
}

impl<D: MutEventSubscriber + Send + 'static> VirtioParts<D> {
    /// `device` behind `transport`, handed to the event loop (it watches the device's
    /// queue and host fds) as one of `subscribers`.
    pub(crate) fn subscribed(
        device: Arc<Mutex<D>>,
        transport: Arc<Mutex<kiln_devices::virtio::MmioTransport>>,
        subscribers: &mut Vec<Subscriber>,
    ) -> Self {
        subscribers.push(device.clone());
        VirtioParts { device, transport }
    }
}

impl<D: Persist> VirtioParts<D> {
    /// The device's and its transport's state; `what` names the device if a lock is
    /// poisoned.
    pub(crate) fn save(
        &self,
        what: &str,
    ) -> Result<crate::snapshot::VirtioSnapshot<D::State>, SnapshotError> {
        let poisoned = || SnapshotError::NotSnapshottable(format!("{what} is poisoned"));
        Ok(crate::snapshot::VirtioSnapshot {
            transport: self.transport.lock().map_err(|_| poisoned())?.save(),
            device: self.device.lock().map_err(|_| poisoned())?.save(),
        })
    }
}

pub(crate) type BlockParts = VirtioParts<kiln_devices::virtio::block::Block>;
pub(crate) type NetParts = VirtioParts<kiln_devices::virtio::net::Net>;
pub(crate) type VsockParts = VirtioParts<kiln_devices::virtio::vsock::Vsock>;
pub(crate) type RngParts = VirtioParts<kiln_devices::virtio::rng::Rng>;

impl Vmm {
    /// Creates memory, the VM, its devices and vCPUs, and loads what the guest boots.
    pub fn build(spec: MachineSpec) -> Result<Self, VmmError> {
        // The mapping keeps the memfd alive; a snapshot reads guest memory through it.
        let mut phases = Phases::default();
        phases.mark("cli_and_config");
        let (memory, _memfd) = memory::create(spec.memory_mib << 20)?;
        phases.mark("guest_memory");
        let vm = Vm::new(&memory, spec.vcpus, spec.track_dirty_pages)?;
        if spec.irqchip {
            vm.create_irqchip()?;
        }
        phases.mark("kvm_vm_and_irqchip");
        let mut buses = Buses::default();
        let legacy = devices::attach_legacy(
            &vm,
            &mut buses,
            spec.console,
            spec.start,
            spec.irqchip,
            None,
        )?;
        for (base, len, dev) in spec.extra_mmio {
            buses
                .mmio
                .insert(dev, base, len)
                .map_err(DeviceError::from)?;
        }

        let mut subscribers: Vec<Subscriber> = Vec::new();
        let mut virtio = devices::VirtioAllocator::default();
        let mut device_cmdline = Vec::new();
        let mut vsock_parts = None;
        if let Some(vsock) = &spec.vsock {
            let device = Arc::new(Mutex::new(
                kiln_devices::virtio::vsock::Vsock::new(vsock.cid, &vsock.uds_path)
                    .map_err(DeviceError::from)?,
            ));
            let slot = virtio.attach(&vm, &mut buses, &memory, device.clone())?;
            device_cmdline.push(slot.cmdline);
            vsock_parts = Some(VirtioParts::subscribed(
                device,
                slot.transport,
                &mut subscribers,
            ));
        }
        let mut disks = Vec::with_capacity(spec.disks.len());
        for (index, disk) in spec.disks.iter().enumerate() {
            let device = Arc::new(Mutex::new(devices::block_device(disk)?));
            let slot = virtio.attach(&vm, &mut buses, &memory, device.clone())?;
            device_cmdline.push(slot.cmdline);
            disks.push(VirtioParts::subscribed(
                device,
                slot.transport,
                &mut subscribers,
            ));
            if disk.root {
                device_cmdline.push(crate::disk::root_cmdline(index, disk.read_only));
            }
        }

        let mut net = None;
        if let Some(config) = &spec.net {
            let device = Arc::new(Mutex::new(config.device().map_err(DeviceError::from)?));
            let slot = virtio.attach(&vm, &mut buses, &memory, device.clone())?;
            device_cmdline.push(slot.cmdline);
            device_cmdline.extend(config.cmdline());
            net = Some(VirtioParts::subscribed(
                device,
                slot.transport,
                &mut subscribers,
            ));
        }

        let mut rng = None;
        if spec.rng {
            let device = Arc::new(Mutex::new(
                kiln_devices::virtio::rng::Rng::new().map_err(DeviceError::from)?,
            ));
            let slot = virtio.attach(&vm, &mut buses, &memory, device.clone())?;
            device_cmdline.push(slot.cmdline);
            rng = Some(VirtioParts::subscribed(
                device,
                slot.transport,
                &mut subscribers,
            ));
        }

        phases.mark("devices");
        let (entry, mode) = match &spec.boot {
            BootSource::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                regs::write_boot_tables(&memory)?;
                mptable::write(&memory, spec.vcpus)?;
                let mut cmdline = cmdline.clone();
                for fragment in &device_cmdline {
                    cmdline.push(' ');
                    cmdline.push_str(fragment);
                }
                let names_init = cmdline.split_whitespace().any(|w| w.starts_with("init="));
                if spec.disks.iter().any(|d| d.root) && initrd.is_none() && !names_init {
                    cmdline.push_str(" init=");
                    cmdline.push_str(crate::disk::ROOT_INIT);
                }
                let k = boot::load_linux(&memory, kernel, initrd.as_deref(), &cmdline)?;
                (k.entry.0, CpuMode::Long)
            }
            BootSource::Raw {
                code,
                load_addr,
                mode,
            } => {
                if *mode == CpuMode::Long {
                    regs::write_boot_tables(&memory)?;
                }
                memory
                    .write_slice(code, GuestAddress(*load_addr))
                    .map_err(|_| VmmError::RawTooLarge {
                        addr: *load_addr,
                        size: code.len(),
                    })?;
                (*load_addr, *mode)
            }
        };

        phases.mark("kernel_load");
        let mut vcpus = Vec::with_capacity(usize::from(spec.vcpus));
        for index in 0..spec.vcpus {
            let vcpu = Vcpu::new(&vm, index)?;
            vcpu.configure(&vm, spec.vcpus, entry, mode)?;
            if spec.irqchip {
                vcpu.configure_lapic()?;
            }
            vcpus.push(vcpu);
        }
        let msr_indices = match vcpus.first() {
            Some(v) => v.saveable_msrs(&vm.msr_index_list()),
            None => Vec::new(),
        };
        let (controller, control) = control_channel().map_err(DeviceError::EventFd)?;
        phases.mark("vcpus");
        Ok(Vmm {
            vcpus,
            buses: Arc::new(buses),
            legacy,
            vsock: vsock_parts,
            disks,
            net,
            rng,
            subscribers,
            boot_done: spec.boot_done,
            stop_evt: EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?,
            controller,
            control,
            start: spec.start,
            machine: MachineInfo {
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                irqchip: spec.irqchip,
                vsock_cid: spec.vsock.as_ref().map(|v| v.cid),
            },
            msr_indices: Arc::new(msr_indices),
            memory,
            vm,
            dirty_log: spec.track_dirty_pages,
            diff_base: None,
            seccomp: spec.seccomp,
            phases,
            snapshot_on_request: spec.snapshot_on_request,
        })
    }

    /// A handle for pause/resume/snapshot/status/shutdown requests from other threads.
    pub fn controller(&self) -> Controller {
        self.controller.clone()
    }

    /// Whether [`Vmm::run`] will confine the VM's threads with seccomp.
    pub fn seccomp_enabled(&self) -> bool {
        self.seccomp
    }

    /// A handle that stops the VM from another thread (or a signal handler thread).
    pub fn stop_handle(&self) -> Result<StopHandle, VmmError> {
        Ok(StopHandle(
            self.stop_evt.try_clone().map_err(DeviceError::EventFd)?,
        ))
    }
}
