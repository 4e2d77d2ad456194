//! One VM from creation to exit: guest memory, the KVM VM, its devices and vCPUs, booted
//! from a spec or resumed from a snapshot along one path ([`Vmm::create`], in
//! `create.rs`); then the vCPU threads and the main thread's event loop ([`Vmm::run`], in
//! `run.rs`), which handles control requests (`control.rs`), takes snapshots
//! (`snapshot.rs`) and decides how the run ended (`events.rs`).

mod control;
mod create;
mod events;
mod run;
mod snapshot;
mod spec;

pub use create::Start;

pub use spec::{BootDoneHook, BootSource, MachineSpec, VsockSpec};

pub use control::{
    control_channel, ControlError, ControlQueue, Controller, Reply, Request, Response,
    SnapshotTaken, Status, VmState,
};

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::MutEventSubscriber;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::BootError;
use crate::device_manager::{DeviceError, DeviceManager};
use crate::memory::{GuestMemory, MemoryError};
use crate::snapshot::{MachineInfo, SnapshotError, SnapshotRef};
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuHandle, VcpuOutcome};
use crate::vstate::vcpu_state::VcpuState;
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
    #[error(transparent)]
    Acpi(#[from] crate::arch::x86_64::acpi::AcpiError),
    #[error("guest code of {size} bytes at {addr:#x} does not fit in guest memory")]
    RawTooLarge { addr: u64, size: usize },
    #[error("event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot restore: {0}")]
    Restore(String),
    #[error("cannot restore: {0}")]
    Restoring(#[from] crate::snapshot::restore::RestoreError),
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

/// One VM, from its creation ([`Vmm::create`]) through its run ([`Vmm::run`]), where the
/// main thread's event loop drives it (`events.rs`), to its end.
pub struct Vmm {
    // The machine.
    // The memory is kept alive for as long as the vCPUs run: KVM maps it into the guest.
    pub(crate) memory: GuestMemory,
    pub(crate) vm: Vm,
    pub(crate) devices: DeviceManager,
    pub(crate) machine: MachineInfo,
    /// The vCPUs until [`Vmm::run`] starts their threads.
    pub(crate) vcpus: Vec<Vcpu>,
    /// MSRs a snapshot saves for each vCPU.
    pub(crate) msr_indices: Arc<Vec<u32>>,

    // The run: vCPU threads and what ends it.
    pub(crate) handles: Vec<VcpuHandle>,
    /// Written by a vCPU thread that stopped; its outcome is on `outcomes`.
    pub(crate) exited: EventFd,
    pub(crate) outcomes: Receiver<(u8, VcpuOutcome)>,
    pub(crate) outcome_sender: Sender<(u8, VcpuOutcome)>,
    pub(crate) halted: usize,
    pub(crate) exit: Option<GuestExit>,
    /// The vCPUs' states while they are paused.
    pub(crate) paused: Option<Vec<VcpuState>>,
    pub(crate) stop_evt: EventFd,
    pub(crate) boot_done: Option<BootDoneHook>,
    pub(crate) controller: Controller,
    pub(crate) control: ControlQueue,

    // Snapshots.
    /// Whether KVM logs dirty pages (diff snapshots need it).
    pub(crate) dirty_log: bool,
    /// The snapshot a diff snapshot would layer over: the last one taken, or the one this
    /// VM was restored from.
    pub(crate) diff_base: Option<SnapshotRef>,
    /// Where a snapshot the guest asks for goes (`kiln job --snapshot-at`).
    pub(crate) snapshot_on_request: Option<PathBuf>,

    // Set-up.
    pub(crate) start: Instant,
    /// When each set-up phase ended.
    pub(crate) phases: Phases,
    /// Whether [`Vmm::run`] confines its threads with seccomp.
    pub(crate) seccomp: bool,
}

impl Vmm {
    /// A handle for pause/resume/snapshot/status/shutdown requests from other threads.
    pub fn controller(&self) -> Controller {
        self.controller.clone()
    }

    /// The guest's memory, to read what kiln wrote into it before the VM runs.
    pub fn guest_memory(&self) -> &GuestMemory {
        &self.memory
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
