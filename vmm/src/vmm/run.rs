//! Running a created VM: one thread per vCPU, and the event loop on the calling thread
//! until the run ends.

use std::sync::{Arc, Mutex, OnceLock};

use event_manager::{EventManager, SubscriberOps};

use super::{GuestExit, RunReport, Subscriber, Vmm, VmmError};
use crate::device_manager::DeviceError;
use crate::seccomp::{Filters, ThreadKind};
use crate::vstate::vcpu::VcpuShared;
use crate::vstate::vcpu_control::Command;

impl Vmm {
    /// Runs the guest until it resets, halts, panics or faults, or is stopped.
    pub fn run(mut self) -> Result<RunReport, VmmError> {
        // Compiled before any thread starts, so that a failure stops nothing half-way.
        let filters = match self.seccomp {
            true => Some(Filters::get().map_err(VmmError::Seccomp)?),
            false => None,
        };
        let first_run = Arc::new(OnceLock::new());
        let mut start_error = None;
        for vcpu in std::mem::take(&mut self.vcpus) {
            let shared = VcpuShared {
                buses: self.devices.buses(),
                msr_indices: self.msr_indices.clone(),
                irqchip: self.machine.irqchip,
                first_run: first_run.clone(),
                outcomes: self.outcome_sender.clone(),
                exited: self.exited.try_clone().map_err(DeviceError::EventFd)?,
                seccomp: filters.clone(),
            };
            match vcpu.start(shared) {
                Ok(h) => self.handles.push(h),
                Err(e) => {
                    start_error = Some(e);
                    break;
                }
            }
        }
        let boot_timer = self.devices.legacy.boot_timer.clone();
        let serial = self.devices.legacy.serial.clone();
        let subscribers = self.devices.subscribers();
        let (start, phases) = (self.start, std::mem::take(&mut self.phases));
        let vmm = Arc::new(Mutex::new(self));
        let result = if start_error.is_none() {
            // From here on this thread runs the event loop, then tears the VM down.
            match filters.as_ref().map(|f| f.install(ThreadKind::Vmm)) {
                Some(Err(e)) => Err(VmmError::Seccomp(e)),
                _ => event_loop(&vmm, subscribers),
            }
        } else {
            Ok(())
        };

        let mut vmm = match Arc::try_unwrap(vmm) {
            Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
            // The event manager is gone, so nothing else holds the VMM.
            Err(_) => {
                return Err(VmmError::Restore(
                    "the event loop kept the VMM alive".into(),
                ))
            }
        };
        for h in &vmm.handles {
            h.command(Command::Stop);
        }
        for h in vmm.handles.drain(..) {
            h.join();
        }
        if let Ok(mut serial) = serial.lock() {
            serial.flush_output();
        }
        if let Some(e) = start_error {
            return Err(e.into());
        }
        result?;
        let exit = vmm
            .exit
            .take()
            .unwrap_or_else(|| GuestExit::Fault("event loop ended without an exit".into()));
        drop(vmm);
        let mut phases = phases.since(start);
        let setup_time = first_run.get().map(|t| t.saturating_duration_since(start));
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

fn event_loop(vmm: &Arc<Mutex<Vmm>>, subscribers: Vec<Subscriber>) -> Result<(), VmmError> {
    let mut manager: EventManager<Subscriber> = EventManager::new().map_err(VmmError::EventLoop)?;
    manager.add_subscriber(vmm.clone());
    for s in subscribers {
        manager.add_subscriber(s);
    }
    loop {
        manager.run().map_err(VmmError::EventLoop)?;
        if vmm.lock().map(|v| v.exit.is_some()).unwrap_or(true) {
            return Ok(());
        }
    }
}
