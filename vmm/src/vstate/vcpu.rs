//! A vCPU: its KVM set-up and the thread that runs it, handing port and MMIO exits to the
//! device buses.
//!
//! The main thread pauses or stops a vCPU by setting its command ([`VcpuControl`]) and
//! sending it the kick signal (`vcpu_signals.rs`): the handler sets `immediate_exit` in the vCPU's `kvm_run`,
//! so KVM_RUN returns at once even when the signal lands just before the thread enters it.

use std::sync::mpsc::Sender;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use super::vcpu_control::{Command, VcpuControl};
use super::vcpu_signals::{block_process_signals, install_kick_handler, kick_signal, KVM_RUN};
use super::vcpu_state;
use super::vm::Vm;
use crate::arch::x86_64::{cpuid, msr, regs, regs::CpuMode};
use crate::device_manager::Buses;
use crate::seccomp::{Filters, ThreadKind};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {0}: {1}")]
    Create(u8, kvm_ioctls::Error),
    #[error("cannot set up vCPU {index} ({what}): {source}")]
    Setup {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot build CPUID/MSR tables: {0:?}")]
    Tables(vmm_sys_util::fam::Error),
    #[error("cannot start the vCPU thread: {0}")]
    Spawn(std::io::Error),
}

/// Why a vCPU thread stopped running its guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuOutcome {
    /// The main thread asked it to stop.
    Stopped,
    /// The guest executed HLT with no in-kernel irqchip to wait for an interrupt.
    Halted,
    /// The guest reset the CPU (triple fault / KVM_EXIT_SHUTDOWN).
    Shutdown,
    /// KVM or the guest failed in a way kiln cannot continue from.
    Fault(String),
}

/// What every vCPU thread of a VM shares with the main thread.
pub struct VcpuShared {
    pub buses: Arc<Buses>,
    /// MSRs a pause saves (those KVM lists and this host reads).
    pub msr_indices: Arc<Vec<u32>>,
    /// Whether the VM has an in-kernel irqchip (then the LAPIC is part of the state).
    pub irqchip: bool,
    /// When the first vCPU first entered KVM_RUN: the end of VMM set-up.
    pub first_run: Arc<OnceLock<Instant>>,
    pub outcomes: Sender<(u8, VcpuOutcome)>,
    pub exited: EventFd,
    /// The filters to confine the thread with before its first KVM_RUN (`None`: off).
    pub seccomp: Option<Filters>,
}

/// A vCPU that has been created and configured but not started.
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
}

impl Vcpu {
    pub fn new(vm: &Vm, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Create(index, e))?;
        Ok(Vcpu { fd, index })
    }

    /// CPUID, MSRs, registers and local APIC for a vCPU of `count` entering at `entry`.
    pub fn configure(
        &self,
        vm: &Vm,
        count: u8,
        entry: u64,
        mode: CpuMode,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let setup = |what| {
            move |source| VcpuError::Setup {
                index,
                what,
                source,
            }
        };
        let mut cpuid = vm.supported_cpuid().map_err(|e| match e {
            super::vm::VmError::Cpuid(source) => VcpuError::Setup {
                index,
                what: "cpuid",
                source,
            },
            _ => unreachable!("supported_cpuid only fails with Cpuid"),
        })?;
        let xsave = cpuid::configure(&mut cpuid, index, count).map_err(VcpuError::Tables)?;
        self.fd.set_cpuid2(&cpuid).map_err(setup("cpuid"))?;
        if let Some(xsave) = xsave {
            // After the CPUID, which says what XCR0 may hold.
            self.fd
                .set_xcrs(&xsave.start_xcrs())
                .map_err(setup("xcrs"))?;
        }
        let msrs = msr::boot_msrs().map_err(VcpuError::Tables)?;
        self.fd.set_msrs(&msrs).map_err(setup("msrs"))?;
        self.fd
            .set_regs(&regs::boot_regs(entry, mode))
            .map_err(setup("regs"))?;
        let sregs = self.fd.get_sregs().map_err(setup("sregs"))?;
        self.fd
            .set_sregs(&regs::boot_sregs(sregs, mode))
            .map_err(setup("sregs"))?;
        self.fd.set_fpu(&regs::boot_fpu()).map_err(setup("fpu"))?;
        Ok(())
    }

    /// Sets LINT0 to ExtINT and LINT1 to NMI, as the MP table says (needs the irqchip).
    pub fn configure_lapic(&self) -> Result<(), VcpuError> {
        let index = self.index;
        let err = |source| VcpuError::Setup {
            index,
            what: "lapic",
            source,
        };
        let mut lapic = self.fd.get_lapic().map_err(err)?;
        crate::arch::x86_64::lapic::set_lints(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(err)
    }

    /// Runs this vCPU on its own thread until it stops; the outcome is sent on
    /// `shared.outcomes` and `shared.exited` is signalled.
    pub fn start(self, shared: VcpuShared) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler();
        let index = self.index;
        let control = Arc::new(VcpuControl::default());
        let thread_control = control.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kiln-vcpu{index}"))
            .spawn(move || {
                block_process_signals();
                let confined = match &shared.seccomp {
                    Some(filters) => filters.install(ThreadKind::Vcpu),
                    None => Ok(()),
                };
                let outcome = match confined {
                    Ok(()) => self.run(&shared, &thread_control),
                    Err(e) => VcpuOutcome::Fault(e.to_string()),
                };
                thread_control.mark_ended();
                // The receiver may be gone if the VMM is already exiting; nothing to do then.
                let _ = shared.outcomes.send((index, outcome));
                let _ = shared.exited.write(1);
            })
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle { thread, control })
    }

    /// Restores a snapshot's state into this (new, unconfigured) vCPU.
    pub fn restore(&self, state: &vcpu_state::VcpuState) -> Result<(), vcpu_state::VcpuStateError> {
        vcpu_state::restore(&self.fd, state)
    }

    /// The MSRs of `listed` this vCPU can read: what a pause saves.
    pub fn saveable_msrs(&self, listed: &[u32]) -> Vec<u32> {
        vcpu_state::saveable_msrs(&self.fd, listed)
    }

    fn run(mut self, shared: &VcpuShared, control: &VcpuControl) -> VcpuOutcome {
        KVM_RUN.with(|c| c.set(self.fd.get_kvm_run()));
        let outcome = loop {
            match control.command() {
                Command::Run => {}
                Command::Stop => break VcpuOutcome::Stopped,
                Command::Pause => {
                    if let Some(outcome) = self.complete_pending_io(&shared.buses) {
                        break outcome;
                    }
                    let state =
                        vcpu_state::save(&self.fd, self.index, &shared.msr_indices, shared.irqchip);
                    if control.pause_here(state) == Command::Stop {
                        break VcpuOutcome::Stopped;
                    }
                    continue;
                }
            }
            shared.first_run.get_or_init(Instant::now);
            match self.fd.run() {
                Ok(exit) => {
                    let triple_fault = matches!(exit, VcpuExit::Shutdown);
                    if let Some(outcome) = handle_exit(exit, &shared.buses) {
                        if triple_fault {
                            self.log_triple_fault();
                        }
                        break outcome;
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => {
                    break VcpuOutcome::Fault(format!("vCPU {}: KVM_RUN failed: {e}", self.index))
                }
            }
        };
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        outcome
    }

    /// KVM_EXIT_SHUTDOWN: the guest triple-faulted, which ends the VM like a reset. Says so,
    /// with where the CPU was, since the guest itself could print nothing. On AMD, KVM has
    /// already reset the vCPU by then (the VMCB is undefined after a shutdown), so the
    /// registers read as the reset vector: the log says that rather than pass them off as
    /// the faulting state.
    fn log_triple_fault(&self) {
        let regs = self.fd.get_regs().ok();
        let sregs = self.fd.get_sregs().ok();
        let (rip, rsp) = regs.map_or((0, 0), |r| (r.rip, r.rsp));
        let (cr2, cr3) = sregs.map_or((0, 0), |s| (s.cr2, s.cr3));
        let reset = rip == 0xfff0 && cr3 == 0;
        tracing::warn!(
            "vCPU {}: the guest triple-faulted (KVM_EXIT_SHUTDOWN): {}",
            self.index,
            if reset {
                "KVM already reset the vCPU, so where it faulted is lost".to_string()
            } else {
                format!("rip {rip:#x} rsp {rsp:#x} cr2 {cr2:#x} cr3 {cr3:#x}")
            }
        );
    }

    /// Lets KVM finish the port or MMIO access whose exit was just handled, without running
    /// any further guest instruction. KVM completes such an access (an IN's value into its
    /// register, RIP past the instruction) only when KVM_RUN is entered again, and keeps
    /// the half-done access where KVM_GET_REGS cannot see it: state saved before that
    /// would have a restored guest redo a write, or lose a read whose side effect (a UART
    /// interrupt acknowledged by reading IIR) already happened. Entering with
    /// `immediate_exit` set completes the access and returns EINTR at once, as the KVM API
    /// documentation prescribes before saving state.
    fn complete_pending_io(&mut self, buses: &Buses) -> Option<VcpuOutcome> {
        self.fd.set_kvm_immediate_exit(1);
        let outcome = loop {
            match self.fd.run() {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => break None,
                // A string instruction may need more than one exit to complete.
                Ok(exit) => {
                    if let Some(outcome) = handle_exit(exit, buses) {
                        break Some(outcome);
                    }
                }
                Err(e) => {
                    break Some(VcpuOutcome::Fault(format!(
                        "vCPU {}: KVM_RUN (completing I/O before a pause) failed: {e}",
                        self.index
                    )))
                }
            }
        };
        self.fd.set_kvm_immediate_exit(0);
        outcome
    }
}

/// Dispatches one exit; `Some` ends the vCPU's run.
fn handle_exit(exit: VcpuExit<'_>, buses: &Buses) -> Option<VcpuOutcome> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !buses.pio.read(u64::from(port), data) {
                data.fill(0);
            }
        }
        VcpuExit::IoOut(port, data) => {
            buses.pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                data.fill(0);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            buses.mmio.write(addr, data);
        }
        VcpuExit::Hlt => return Some(VcpuOutcome::Halted),
        VcpuExit::Shutdown => return Some(VcpuOutcome::Shutdown),
        VcpuExit::Intr => {}
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(VcpuOutcome::Fault(format!(
                "KVM could not enter the guest (hardware entry failure reason {reason:#x} on cpu {cpu})"
            )))
        }
        VcpuExit::InternalError => {
            return Some(VcpuOutcome::Fault(
                "KVM internal error (the guest ran an instruction KVM could not emulate)".into(),
            ))
        }
        VcpuExit::SystemEvent(kind, _) => {
            return Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    VcpuOutcome::Shutdown
                }
                other => VcpuOutcome::Fault(format!("guest system event {other}")),
            })
        }
        other => return Some(VcpuOutcome::Fault(format!("unexpected vCPU exit: {other:?}"))),
    }
    None
}

/// A running vCPU thread.
pub struct VcpuHandle {
    thread: JoinHandle<()>,
    control: Arc<VcpuControl>,
}

impl VcpuHandle {
    /// Interrupts KVM_RUN so the thread sees its stop flag.
    pub fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        // SAFETY: the pthread_t belongs to a thread we spawned and have not joined, so it is
        // valid; sending a signal has no memory-safety preconditions.
        unsafe { libc::pthread_kill(self.thread.as_pthread_t(), kick_signal()) };
    }

    /// Asks the thread to run, pause or stop, and kicks it out of KVM_RUN.
    pub fn command(&self, command: Command) {
        self.control.set(command);
        self.kick();
    }

    pub fn control(&self) -> &VcpuControl {
        &self.control
    }

    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}
