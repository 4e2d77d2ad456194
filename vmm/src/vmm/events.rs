//! The event loop's view of a running VM: it watches what ends a run (guest reset, vCPU
//! exits, a stop) and carries out control requests (pause, resume, snapshot, status).

use std::os::fd::AsRawFd;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::control::{ControlError, Reply, Request, Response, SnapshotTaken, Status, VmState};
use super::{GuestExit, Vmm};
use crate::snapshot::SnapshotKind;
use crate::vstate::vcpu::VcpuOutcome;
use crate::vstate::vcpu_control::Command;

/// How long a vCPU may take to stop and hand over its state.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl Vmm {
    /// A reset after the console showed a kernel panic is a panic, not a reboot.
    fn reset_or_panic(&self) -> GuestExit {
        match self.devices.legacy.panic_watch.panic_line() {
            Some(line) => GuestExit::Panic(line),
            None => GuestExit::Reset,
        }
    }

    fn set_exit(&mut self, exit: GuestExit) {
        if self.exit.is_none() {
            self.exit = Some(exit);
        }
    }

    fn vcpu_exits(&mut self) {
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
                    if self.halted == usize::from(self.machine.vcpus) {
                        self.set_exit(GuestExit::Halted);
                    }
                }
                VcpuOutcome::Stopped => {}
            }
        }
    }

    fn control_requests(&mut self) {
        let _ = self.control.evt.read();
        while let Ok((request, reply)) = self.control.requests.try_recv() {
            let response = self.handle(request);
            let _ = reply.send(response);
        }
    }

    fn handle(&mut self, request: Request) -> Response {
        let state = |state| Reply::State { state };
        match request {
            Request::Pause => self.pause().map(|()| state(VmState::Paused)),
            Request::Resume => {
                self.resume();
                Ok(state(VmState::Running))
            }
            Request::Status => Ok(Reply::Status(Status {
                state: self.state(),
                vcpus: self.machine.vcpus,
                memory_mib: self.machine.memory_mib,
                boot_ms: self
                    .devices
                    .legacy
                    .boot_timer
                    .boot_time()
                    .map(|t| t.as_secs_f64() * 1e3),
            })),
            Request::Shutdown => {
                self.set_exit(GuestExit::Stopped);
                Ok(state(VmState::Stopping))
            }
            Request::Snapshot { dir, resume, kind } => {
                let was_paused = self.paused.is_some();
                self.pause()?;
                let started = std::time::Instant::now();
                let result = self.snapshot(&dir, kind);
                if resume && !was_paused {
                    self.resume();
                }
                let memory_bytes_written = result?;
                Ok(Reply::Snapshot(SnapshotTaken {
                    dir,
                    kind,
                    memory_bytes_written,
                    ms: started.elapsed().as_secs_f64() * 1e3,
                    state: if resume {
                        VmState::Running
                    } else {
                        self.state()
                    },
                }))
            }
        }
    }

    fn state(&self) -> VmState {
        if self.paused.is_some() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    /// The guest asked for a snapshot: take it where `snapshot_on_request` says, resume,
    /// and tell the guest how it went.
    fn guest_snapshot_request(&mut self) {
        let ok = match self.snapshot_on_request.clone() {
            Some(dir) => match self.handle(Request::Snapshot {
                dir: dir.clone(),
                resume: true,
                kind: SnapshotKind::Full,
            }) {
                Ok(_) => {
                    tracing::info!("snapshot taken at the guest's request: {}", dir.display());
                    true
                }
                Err(e) => {
                    tracing::error!("the snapshot the guest asked for failed: {e}");
                    false
                }
            },
            None => {
                tracing::warn!("the guest asked for a snapshot; this VM takes none on request");
                false
            }
        };
        self.devices.legacy.snapshot_requests.complete(ok);
    }

    /// Pauses every vCPU and keeps their states. Pausing a paused VM does nothing.
    fn pause(&mut self) -> Result<(), ControlError> {
        if self.paused.is_some() {
            return Ok(());
        }
        for h in &self.handles {
            h.command(Command::Pause);
        }
        let mut states = Vec::with_capacity(self.handles.len());
        let mut failure = None;
        for (i, h) in self.handles.iter().enumerate() {
            match h.control().wait_paused(PAUSE_TIMEOUT) {
                Some(Ok(state)) => states.push(state),
                Some(Err(e)) => failure = Some(e.into()),
                None => {
                    failure = Some(ControlError::PauseTimeout {
                        index: i,
                        timeout: PAUSE_TIMEOUT,
                    })
                }
            }
        }
        if let Some(e) = failure {
            self.resume_threads();
            return Err(e);
        }
        self.paused = Some(states);
        Ok(())
    }

    fn resume(&mut self) {
        self.paused = None;
        self.resume_threads();
    }

    fn resume_threads(&self) {
        for h in &self.handles {
            h.command(Command::Run);
        }
    }
}

impl MutEventSubscriber for Vmm {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            self.devices.legacy.reset_evt.as_raw_fd(),
            self.devices.legacy.boot_evt.as_raw_fd(),
            self.exited.as_raw_fd(),
            self.stop_evt.as_raw_fd(),
            self.control.evt.as_raw_fd(),
            self.devices.legacy.snapshot_evt.as_raw_fd(),
        ];
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("cannot watch a VMM event: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.devices.legacy.reset_evt.as_raw_fd() {
            let _ = self.devices.legacy.reset_evt.read();
            let exit = self.reset_or_panic();
            self.set_exit(exit);
        } else if fd == self.devices.legacy.boot_evt.as_raw_fd() {
            let _ = self.devices.legacy.boot_evt.read();
            if let Some(t) = self.devices.legacy.boot_timer.boot_time() {
                tracing::info!("guest boot done in {:.1} ms", t.as_secs_f64() * 1e3);
                if let Some(hook) = self.boot_done.take() {
                    hook(t);
                }
            }
        } else if fd == self.stop_evt.as_raw_fd() {
            let _ = self.stop_evt.read();
            self.set_exit(GuestExit::Stopped);
        } else if fd == self.exited.as_raw_fd() {
            self.vcpu_exits();
        } else if fd == self.control.evt.as_raw_fd() {
            self.control_requests();
        } else if fd == self.devices.legacy.snapshot_evt.as_raw_fd() {
            let _ = self.devices.legacy.snapshot_evt.read();
            self.guest_snapshot_request();
        }
    }
}
