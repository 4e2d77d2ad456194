//! Running a built VM: one thread per vCPU, and the event loop on the calling thread until
//! the run ends.

use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex, OnceLock};

use event_manager::{EventManager, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::core::VmmCore;
use super::{GuestExit, RunReport, Subscriber, Vmm, VmmError};
use crate::devices::DeviceError;
use crate::seccomp::{Filters, ThreadKind};
use crate::vstate::vcpu::VcpuShared;
use crate::vstate::vcpu_control::Command;

impl Vmm {
    /// Runs the guest until it resets, halts, panics or faults, or is stopped.
    pub fn run(self) -> Result<RunReport, VmmError> {
        // Compiled before any thread starts, so that a failure stops nothing half-way.
        let filters = match self.seccomp {
            true => Some(Filters::get().map_err(VmmError::Seccomp)?),
            false => None,
        };
        let first_run = Arc::new(OnceLock::new());
        let (tx, rx) = channel();
        let exited = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        let mut handles = Vec::with_capacity(self.vcpus.len());
        let mut start_error = None;
        let vcpu_count = self.vcpus.len();
        for vcpu in self.vcpus {
            let shared = VcpuShared {
                buses: self.buses.clone(),
                msr_indices: self.msr_indices.clone(),
                irqchip: self.machine.irqchip,
                first_run: first_run.clone(),
                outcomes: tx.clone(),
                exited: exited.try_clone().map_err(DeviceError::EventFd)?,
                seccomp: filters.clone(),
            };
            match vcpu.start(shared) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    start_error = Some(e);
                    break;
                }
            }
        }
        let boot_timer = self.legacy.boot_timer.clone();
        let serial = self.legacy.serial.clone();
        let core = Arc::new(Mutex::new(VmmCore {
            exited,
            outcomes: rx,
            vcpu_count,
            halted: 0,
            stop_evt: self.stop_evt,
            boot_done: self.boot_done,
            exit: None,
            handles,
            paused: None,
            legacy: self.legacy,
            vsock: self.vsock,
            disks: self.disks,
            net: self.net,
            rng: self.rng,
            control: self.control,
            machine: self.machine,
            memory: self.memory.clone(),
            vm: self.vm,
            dirty_log: self.dirty_log,
            diff_base: self.diff_base,
            snapshot_on_request: self.snapshot_on_request,
        }));
        let result = if start_error.is_none() {
            // From here on this thread runs the event loop, then tears the VM down.
            match filters.as_ref().map(|f| f.install(ThreadKind::Vmm)) {
                Some(Err(e)) => Err(VmmError::Seccomp(e)),
                _ => event_loop(&core, self.subscribers),
            }
        } else {
            Ok(())
        };

        let mut core = match Arc::try_unwrap(core) {
            Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
            // The event manager is gone, so nothing else holds the core.
            Err(_) => {
                return Err(VmmError::Restore(
                    "the event loop kept the VMM alive".into(),
                ))
            }
        };
        for h in &core.handles {
            h.command(Command::Stop);
        }
        for h in core.handles.drain(..) {
            h.join();
        }
        if let Ok(mut serial) = serial.lock() {
            serial.flush_output();
        }
        drop(self.memory);
        if let Some(e) = start_error {
            return Err(e.into());
        }
        result?;
        let exit = core
            .exit
            .take()
            .unwrap_or_else(|| GuestExit::Fault("event loop ended without an exit".into()));
        let mut phases = self.phases.since(self.start);
        let setup_time = first_run
            .get()
            .map(|t| t.saturating_duration_since(self.start));
        if let Some(t) = setup_time {
            phases.push(("first_kvm_run", t));
        }
        Ok(RunReport {
            exit,
            boot_time: boot_timer.boot_time(),
            setup_time,
            phases,
        })
    }
}

fn event_loop(core: &Arc<Mutex<VmmCore>>, subscribers: Vec<Subscriber>) -> Result<(), VmmError> {
    let mut manager: EventManager<Subscriber> = EventManager::new().map_err(VmmError::EventLoop)?;
    manager.add_subscriber(core.clone());
    for s in subscribers {
        manager.add_subscriber(s);
    }
    loop {
        manager.run().map_err(VmmError::EventLoop)?;
        if core.lock().map(|c| c.exit.is_some()).unwrap_or(true) {
            return Ok(());
        }
    }
}
