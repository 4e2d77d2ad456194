//! How the main thread steers a running vCPU thread: run, pause (handing back the vCPU's
//! state, for a snapshot) or stop.
//!
//! The main thread sets the command, then kicks the thread out of KVM_RUN
//! ([`super::vcpu::VcpuHandle::kick`]); the thread sees the command before it enters
//! KVM_RUN again.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::vcpu_state::VcpuState;

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
    paused: Option<Result<VcpuState, String>>,
    /// The vCPU thread has ended (it will never pause).
    ended: bool,
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
            if command != Command::Pause {
                inner.paused = None;
            }
        }
        self.changed.notify_all();
    }

    /// Waits until the thread has paused and takes its state. `None` if the thread ended
    /// instead, did not pause within `timeout`, or its state was taken already.
    pub fn wait_paused(&self, timeout: Duration) -> Option<Result<VcpuState, String>> {
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
    pub fn pause_here(&self, state: Result<VcpuState, String>) -> Command {
        let mut inner = self.lock();
        inner.paused = Some(state);
        self.changed.notify_all();
        while inner.command == Command::Pause {
            inner = self.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        inner.command
    }

    /// The vCPU thread's side: it is about to end.
    pub fn mark_ended(&self) {
        self.lock().ended = true;
        self.changed.notify_all();
    }
}
