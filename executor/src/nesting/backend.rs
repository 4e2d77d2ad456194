//! What the nesting server needs from whatever runs the VMs: boot one of an image in a
//! slot, destroy one, say whether one still runs. [`super::provider`] holds the
//! runner-facing rules on top of it; the real implementation is [`super::kiln`].

use serde::{Deserialize, Serialize};

/// A VM the server holds, as kept on disk so that a restarted server finds it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    pub slot: i32,
    /// The image it was booted from (the runner's `name`).
    pub image: String,
    /// The VM's `kiln` process and its start time (field 22 of /proc/PID/stat), so that a
    /// recycled pid is never taken for the VM.
    pub pid: i32,
    pub start_time: u64,
    /// Where the runner reaches its SSH server, `<ip>:22`.
    pub addr: String,
}

/// What one Create asks the backend for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub id: String,
    pub slot: i32,
    pub image: String,
    pub memory_mib: u64,
    pub vcpus: u64,
    /// The SSH login the VM must accept before Create returns.
    pub ssh_user: String,
    pub ssh_password: String,
}

/// Why the backend could not do something; [`super::provider`] maps each to a gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The VM did not become reachable in time (it has been destroyed).
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Failed(String),
}

/// Runs VMs. Methods that wait are async; they must not block the runtime's threads for
/// long (use `spawn_blocking` for blocking work).
#[tonic::async_trait]
pub trait VmBackend: Send + Sync + 'static {
    /// The images a Create may name, sorted.
    fn images(&self) -> Vec<String>;
    /// Memory (MiB) the host can still give to a new VM.
    fn available_memory_mib(&self) -> u64;
    /// Boots a VM and returns once its SSH server accepts connections with the spec's
    /// login; on failure nothing of it is left running.
    async fn create(&self, spec: &VmSpec) -> Result<VmRecord, BackendError>;
    /// Stops the VM (if it still runs) and removes what it left on the host.
    async fn destroy(&self, vm: &VmRecord) -> Result<(), BackendError>;
    /// Whether the VM's process is still the one that was started.
    fn alive(&self, vm: &VmRecord) -> bool;
    /// Destroys every VM this backend started that is not in `keep`, and what it left on
    /// the host: those of Creates a killed server never finished. Returns their ids.
    async fn sweep(&self, keep: &[VmRecord]) -> Vec<String>;
}
