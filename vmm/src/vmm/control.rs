//! Requests to a running VM from other threads (the API socket's, a test's): pause,
//! resume, snapshot, status, shutdown.
//!
//! A [`Controller`] queues the request and wakes the event loop through an eventfd; the
//! event loop, which owns the VM, carries it out and answers on a channel.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::snapshot::{SnapshotError, SnapshotKind};
use crate::vstate::vcpu_state::VcpuStateError;
use vmm_sys_util::eventfd::EventFd;

/// What can be asked of a running VM. As JSON: `{"cmd":"pause"}`,
/// `{"cmd":"snapshot","dir":"/path","resume":true}` …
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Stop the vCPUs where they are.
    Pause,
    /// Let paused vCPUs run again.
    Resume,
    /// Write a snapshot into `dir` (created; must not hold a snapshot already): `full`
    /// (the default) or `diff`, which holds only the pages written since the VM's previous
    /// snapshot and layers over it. The VM is paused for it and, if `resume` (the
    /// default), resumed after.
    Snapshot {
        dir: PathBuf,
        #[serde(default = "yes")]
        resume: bool,
        #[serde(default)]
        kind: SnapshotKind,
    },
    /// Whether the VM runs or is paused, its vCPUs and memory.
    Status,
    /// Stop the VM (as SIGTERM would).
    Shutdown,
}

fn yes() -> bool {
    true
}

/// Whether the VM runs, as an answer gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    Paused,
    /// A shutdown was asked for: the VM ends next.
    Stopping,
}

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: VmState,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// From the VMM's start to the guest's boot-done mark, once it came.
    pub boot_ms: Option<f64>,
}

/// The answer to `snapshot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotTaken {
    pub dir: PathBuf,
    pub kind: SnapshotKind,
    pub memory_bytes_written: u64,
    /// How long the snapshot took (the VM was paused meanwhile).
    pub ms: f64,
    /// The VM's state after it.
    pub state: VmState,
}

/// What a request that succeeded answers; as JSON, the fields of the variant.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Status(Status),
    Snapshot(SnapshotTaken),
    /// `pause`, `resume` and `shutdown`: the VM's state after the request.
    State {
        state: VmState,
    },
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the VM's control channel is broken")]
    ChannelBroken,
    #[error("the VM is not running")]
    NotRunning,
    #[error("cannot wake the VM's event loop: {0}")]
    Wake(std::io::Error),
    #[error("the VM ended before answering")]
    NoAnswer,
    #[error("vCPU {index} did not pause within {timeout:?} (or its thread ended)")]
    PauseTimeout { index: usize, timeout: Duration },
    #[error(transparent)]
    VcpuState(#[from] VcpuStateError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// The answer to a request.
pub type Response = Result<Reply, ControlError>;

type Queued = (Request, Sender<Response>);

/// The event loop's end: the requests waiting and the eventfd that announces them.
pub struct ControlQueue {
    pub(super) evt: EventFd,
    pub(super) requests: Receiver<Queued>,
}

/// A cloneable handle that sends requests to the VM's event loop and waits for answers.
#[derive(Clone)]
pub struct Controller {
    evt: Arc<EventFd>,
    requests: Arc<Mutex<Sender<Queued>>>,
}

/// A controller and the queue it feeds.
pub fn control_channel() -> std::io::Result<(Controller, ControlQueue)> {
    let evt = EventFd::new(libc::EFD_NONBLOCK)?;
    let (tx, rx) = channel();
    let controller = Controller {
        evt: Arc::new(evt.try_clone()?),
        requests: Arc::new(Mutex::new(tx)),
    };
    Ok((controller, ControlQueue { evt, requests: rx }))
}

#[cfg(test)]
impl ControlQueue {
    /// The next request, waited for: a test standing in for the event loop.
    pub(crate) fn next(&self) -> Option<Queued> {
        self.requests.recv().ok()
    }
}

impl Controller {
    /// Sends `request` and waits for the answer (an error if the VM is gone).
    pub fn call(&self, request: Request) -> Response {
        let (tx, rx) = channel();
        self.requests
            .lock()
            .map_err(|_| ControlError::ChannelBroken)?
            .send((request, tx))
            .map_err(|_| ControlError::NotRunning)?;
        self.evt.write(1).map_err(ControlError::Wake)?;
        rx.recv().map_err(|_| ControlError::NoAnswer)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_as_json() {
        let r: Request = serde_json::from_str(r#"{"cmd":"snapshot","dir":"/s"}"#).unwrap();
        assert_eq!(
            r,
            Request::Snapshot {
                dir: "/s".into(),
                resume: true,
                kind: SnapshotKind::Full,
            }
        );
        let r: Request =
            serde_json::from_str(r#"{"cmd":"snapshot","dir":"/d","kind":"diff","resume":false}"#)
                .unwrap();
        assert_eq!(
            r,
            Request::Snapshot {
                dir: "/d".into(),
                resume: false,
                kind: SnapshotKind::Diff,
            }
        );
        assert!(serde_json::from_str::<Request>(
            r#"{"cmd":"snapshot","dir":"/d","kind":"partial"}"#
        )
        .is_err());
        let r: Request = serde_json::from_str(r#"{"cmd":"pause"}"#).unwrap();
        assert_eq!(r, Request::Pause);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
    }

    #[test]
    fn a_call_without_an_event_loop_fails_cleanly() {
        let (controller, queue) = control_channel().unwrap();
        drop(queue);
        assert!(controller.call(Request::Status).is_err());
    }
}
