//! One VM from build to exit: guest memory, the KVM VM, devices, vCPU threads, and the main
//! thread's event loop that decides how the run ended.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kiln_devices::SharedBusDevice;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::{mptable, regs, regs::CpuMode};
use crate::boot::{self, BootError};
use crate::devices::{self, Buses, DeviceError, LegacyDevices};
use crate::memory::{self, GuestMemory, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuOutcome, VcpuShared};
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
}

/// What the guest runs.
pub enum BootSource {
    /// A Linux kernel with its initramfs and command line.
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
    /// Hand-made guest code, loaded and entered at `load_addr` (used by the direct tests).
    Raw {
        code: Vec<u8>,
        load_addr: u64,
        mode: CpuMode,
    },
}

/// Everything needed to build one VM.
pub struct MachineSpec {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub boot: BootSource,
    /// Receives the guest's serial console output.
    pub console: Box<dyn Write + Send>,
    /// In-kernel PIC/IOAPIC/LAPIC and PIT. Linux needs them; without them HLT exits to kiln,
    /// which the direct tests use to end a hand-made guest.
    pub irqchip: bool,
    /// Extra MMIO devices as (base, length, device): used by tests.
    pub extra_mmio: Vec<(u64, u64, SharedBusDevice)>,
    /// The instant the boot time is measured from (normally the kiln process's start).
    pub start: Instant,
    /// A virtio-vsock device, for the guest agent.
    pub vsock: Option<VsockSpec>,
    /// Told once when the guest marks boot done (the agent is ready).
    pub boot_done: Option<BootDoneHook>,
}

/// Called once, on the event loop thread, when the guest marks boot done.
pub type BootDoneHook = Box<dyn FnOnce(Duration) + Send>;

/// The vsock device of a VM.
#[derive(Debug, Clone)]
pub struct VsockSpec {
    /// The guest's context ID (3 or more).
    pub cid: u64,
    /// The Unix socket host clients connect to (`CONNECT <port>`); must not exist yet.
    pub uds_path: PathBuf,
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
type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A built VM, ready to run.
pub struct Vmm {
    vcpus: Vec<Vcpu>,
    buses: Arc<Buses>,
    legacy: LegacyDevices,
    /// Devices with file descriptors the event loop watches (vsock).
    subscribers: Vec<Subscriber>,
    boot_done: Option<BootDoneHook>,
    stop_evt: EventFd,
    start: Instant,
    // Kept alive for as long as the vCPUs run: KVM maps this memory into the guest.
    _memory: GuestMemory,
    _memory_file: File,
    _vm: Vm,
}

impl Vmm {
    /// Creates memory, the VM, its devices and vCPUs, and loads what the guest boots.
    pub fn build(spec: MachineSpec) -> Result<Self, VmmError> {
        let (memory, memory_file) = memory::create(spec.memory_mib << 20)?;
        let vm = Vm::new(&memory, spec.vcpus)?;
        if spec.irqchip {
            vm.create_irqchip()?;
        }
        let mut buses = Buses::default();
        let legacy =
            devices::attach_legacy(&vm, &mut buses, spec.console, spec.start, spec.irqchip)?;
        for (base, len, dev) in spec.extra_mmio {
            buses
                .mmio
                .insert(dev, base, len)
                .map_err(DeviceError::from)?;
        }

        let mut subscribers: Vec<Subscriber> = Vec::new();
        let mut virtio = devices::VirtioAllocator::default();
        let mut device_cmdline = Vec::new();
        if let Some(vsock) = &spec.vsock {
            let device = Arc::new(Mutex::new(
                kiln_devices::virtio::vsock::Vsock::new(vsock.cid, &vsock.uds_path)
                    .map_err(DeviceError::from)?,
            ));
            let slot = virtio.attach(&vm, &mut buses, &memory, device.clone())?;
            device_cmdline.push(slot.cmdline);
            subscribers.push(device);
        }

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

        let mut vcpus = Vec::with_capacity(usize::from(spec.vcpus));
        for index in 0..spec.vcpus {
            let vcpu = Vcpu::new(&vm, index)?;
            vcpu.configure(&vm, spec.vcpus, entry, mode)?;
            if spec.irqchip {
                vcpu.configure_lapic()?;
            }
            vcpus.push(vcpu);
        }
        Ok(Vmm {
            vcpus,
            buses: Arc::new(buses),
            legacy,
            subscribers,
            boot_done: spec.boot_done,
            stop_evt: EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?,
            start: spec.start,
            _memory: memory,
            _memory_file: memory_file,
            _vm: vm,
        })
    }

    /// A handle that stops the VM from another thread (or a signal handler thread).
    pub fn stop_handle(&self) -> Result<StopHandle, VmmError> {
        Ok(StopHandle(
            self.stop_evt.try_clone().map_err(DeviceError::EventFd)?,
        ))
    }

    /// Runs the guest until it resets, halts, panics or faults, or is stopped.
    pub fn run(self) -> Result<RunReport, VmmError> {
        let vcpu_count = self.vcpus.len();
        let stop = Arc::new(AtomicBool::new(false));
        let first_run = Arc::new(OnceLock::new());
        let (tx, rx) = channel();
        let exited = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        let mut handles = Vec::with_capacity(vcpu_count);
        let mut start_error = None;
        for vcpu in self.vcpus {
            let shared = VcpuShared {
                buses: self.buses.clone(),
                stop: stop.clone(),
                first_run: first_run.clone(),
                outcomes: tx.clone(),
                exited: exited.try_clone().map_err(DeviceError::EventFd)?,
            };
            match vcpu.start(shared) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    start_error = Some(e);
                    break;
                }
            }
        }

        let watcher = Arc::new(Mutex::new(ExitWatcher {
            reset_evt: self.legacy.reset_evt,
            boot_evt: self.legacy.boot_evt,
            exited,
            outcomes: rx,
            panic_watch: self.legacy.panic_watch.clone(),
            boot_timer: self.legacy.boot_timer.clone(),
            vcpu_count,
            halted: 0,
            stop_evt: self.stop_evt,
            boot_done: self.boot_done,
            exit: None,
        }));
        let result = if start_error.is_none() {
            event_loop(&watcher, self.subscribers)
        } else {
            Ok(())
        };

        stop.store(true, Ordering::Release);
        for h in &handles {
            h.kick();
        }
        for h in handles {
            h.join();
        }
        if let Ok(mut serial) = self.legacy.serial.lock() {
            serial.flush_output();
        }
        if let Some(e) = start_error {
            return Err(e.into());
        }
        result?;
        let exit = match watcher.lock() {
            Ok(mut w) => w.exit.take(),
            Err(poisoned) => poisoned.into_inner().exit.take(),
        }
        .unwrap_or_else(|| GuestExit::Fault("event loop ended without an exit".into()));
        Ok(RunReport {
            exit,
            boot_time: self.legacy.boot_timer.boot_time(),
            setup_time: first_run
                .get()
                .map(|t| t.saturating_duration_since(self.start)),
        })
    }
}

fn event_loop(
    watcher: &Arc<Mutex<ExitWatcher>>,
    subscribers: Vec<Subscriber>,
) -> Result<(), VmmError> {
    let mut manager: EventManager<Subscriber> = EventManager::new().map_err(VmmError::EventLoop)?;
    manager.add_subscriber(watcher.clone());
    for s in subscribers {
        manager.add_subscriber(s);
    }
    loop {
        manager.run().map_err(VmmError::EventLoop)?;
        if watcher.lock().map(|w| w.exit.is_some()).unwrap_or(true) {
            return Ok(());
        }
    }
}

/// Watches the events that end a run (guest reset, vCPU exits) and the boot-done mark.
struct ExitWatcher {
    reset_evt: EventFd,
    boot_evt: EventFd,
    exited: EventFd,
    outcomes: Receiver<(u8, VcpuOutcome)>,
    panic_watch: kiln_devices::PanicWatch,
    boot_timer: kiln_devices::BootTimer,
    vcpu_count: usize,
    halted: usize,
    stop_evt: EventFd,
    boot_done: Option<BootDoneHook>,
    exit: Option<GuestExit>,
}

impl ExitWatcher {
    /// A reset after the console showed a kernel panic is a panic, not a reboot.
    fn reset_or_panic(&self) -> GuestExit {
        match self.panic_watch.panic_line() {
            Some(line) => GuestExit::Panic(line),
            None => GuestExit::Reset,
        }
    }

    fn set_exit(&mut self, exit: GuestExit) {
        if self.exit.is_none() {
            self.exit = Some(exit);
        }
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            &self.reset_evt,
            &self.boot_evt,
            &self.exited,
            &self.stop_evt,
        ] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                tracing::error!("cannot watch a VMM event: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        let fd = events.fd();
        if fd == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            let exit = self.reset_or_panic();
            self.set_exit(exit);
        } else if fd == self.boot_evt.as_raw_fd() {
            let _ = self.boot_evt.read();
            if let Some(t) = self.boot_timer.boot_time() {
                tracing::info!("guest boot done in {:.1} ms", t.as_secs_f64() * 1e3);
                if let Some(hook) = self.boot_done.take() {
                    hook(t);
                }
            }
        } else if fd == self.stop_evt.as_raw_fd() {
            let _ = self.stop_evt.read();
            self.set_exit(GuestExit::Stopped);
        } else if fd == self.exited.as_raw_fd() {
            let _ = self.exited.read();
            while let Ok((index, outcome)) = self.outcomes.try_recv() {
                tracing::debug!("vCPU {index} stopped: {outcome:?}");
                match outcome {
                    VcpuOutcome::Shutdown => {
                        let exit = self.reset_or_panic();
                        self.set_exit(exit);
                    }
                    VcpuOutcome::Fault(msg) => self.set_exit(GuestExit::Fault(msg)),
                    VcpuOutcome::Halted => {
                        self.halted += 1;
                        if self.halted == self.vcpu_count {
                            self.set_exit(GuestExit::Halted);
                        }
                    }
                    VcpuOutcome::Stopped => {}
                }
            }
        }
    }
}
