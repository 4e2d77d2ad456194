//! How the main thread steers a running vCPU thread: run, pause (handing back the vCPU's
//! state, for a snapshot) or stop.
//!
//! The main thread sets the command, then kicks the thread out of KVM_RUN
//! ([`super::vcpu::VcpuHandle::kick`]); the thread sees the command before it enters
//! KVM_RUN again.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::vcpu_state::{VcpuState, VcpuStateError};

/// What a vCPU thread should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Run,
    Pause,
    Stop,
}

struct Inner {
    command: Command,
    /// Set by the vCPU thread once it has paused: its state, or why it could not be read.
    paused: Option<Result<VcpuState, VcpuStateError>>,
    /// The vCPU thread has ended (it will never pause).
    ended: bool,
    /// Counts the commands set. A paused thread waits for it to move, not for the command
    /// to differ from Pause: a resume followed at once by another pause must wake it too,
    /// or it would sleep through the second pause without reporting its state.
    generation: u64,
}

/// Shared between the main thread and one vCPU thread.
pub struct VcpuControl {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Default for VcpuControl {
    fn default() -> Self {
        VcpuControl {
            inner: Mutex::new(Inner {
                command: Command::Run,
                paused: None,
                ended: false,
                generation: 0,
            }),
            changed: Condvar::new(),
        }
    }
}

impl VcpuControl {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The main thread's side: asks for `command` (kick the thread afterwards).
    pub fn set(&self, command: Command) {
        let mut inner = self.lock();
        if inner.command != command {
            inner.command = command;
            inner.generation += 1;
            if command != Command::Pause {
                inner.paused = None;
            }
        }
        self.changed.notify_all();
    }

    /// Waits until the thread has paused and takes its state. `None` if the thread ended
    /// instead, did not pause within `timeout`, or its state was taken already.
    pub fn wait_paused(&self, timeout: Duration) -> Option<Result<VcpuState, VcpuStateError>> {
        let inner = self.lock();
        let (mut inner, _) = self
            .changed
            .wait_timeout_while(inner, timeout, |i| i.paused.is_none() && !i.ended)
            .unwrap_or_else(|p| p.into_inner());
        inner.paused.take()
    }

    /// The vCPU thread's side: what to do next.
    pub fn command(&self) -> Command {
        self.lock().command
    }

    /// The vCPU thread's side: report the pause, then wait until told to run or stop.
    pub fn pause_here(&self, state: Result<VcpuState, VcpuStateError>) -> Command {
        let mut inner = self.lock();
        inner.paused = Some(state);
        self.changed.notify_all();
        let generation = inner.generation;
        while inner.command == Command::Pause && inner.generation == generation {
            inner = self.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        // Run, Stop, or (after a resume this thread did not see) Pause again: the caller
        // acts on it, saving and reporting its state anew for a new pause.
        inner.command
    }

    /// The vCPU thread's side: it is about to end.
    pub fn mark_ended(&self) {
        self.lock().ended = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A vCPU thread's loop, without KVM: pause when told, report a stand-in state.
    fn fake_vcpu(control: Arc<VcpuControl>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || loop {
            match control.command() {
                Command::Run => std::thread::yield_now(),
                Command::Pause => {
                    let stand_in = VcpuStateError {
                        index: 0,
                        action: "read",
                        what: "regs",
                        source: kvm_ioctls::Error::new(libc::EIO),
                    };
                    if control.pause_here(Err(stand_in)) == Command::Stop {
                        break;
                    }
                }
                Command::Stop => break,
            }
        })
    }

    #[test]
    fn a_pause_right_after_a_resume_is_reported() {
        let control = Arc::new(VcpuControl::default());
        let thread = fake_vcpu(control.clone());
        for round in 0..50 {
            control.set(Command::Pause);
            let state = control.wait_paused(Duration::from_secs(5));
            assert!(state.is_some(), "pause {round} was not reported");
            // Resume and pause again at once, before the thread can have woken: it must
            // still report the second pause.
            control.set(Command::Run);
        }
        control.set(Command::Pause);
        assert!(control.wait_paused(Duration::from_secs(5)).is_some());
        control.set(Command::Stop);
        thread.join().unwrap();
    }
}
