//! A backend that runs no VMs, for the provider's and the service's tests: "VMs" are
//! entries in a set; destroy and create can be made to fail, create to wait on a barrier.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

use super::backend::{BackendError, VmBackend, VmRecord, VmSpec};

/// What a failing create returns.
pub type MakeError = fn(String) -> BackendError;

/// Runs "VMs" as entries in a set; destroy and create can be made to fail, and create can
/// be made to wait on a barrier.
#[derive(Default)]
pub struct Fake {
    pub running: Mutex<HashSet<String>>,
    pub destroyed: Mutex<Vec<String>>,
    pub fail_destroy: Mutex<HashSet<String>>,
    pub create_error: Mutex<Option<MakeError>>,
    pub barrier: Option<tokio::sync::Barrier>,
    pub memory_mib: u64,
    pub next_pid: AtomicI32,
}

impl Fake {
    pub fn new() -> Fake {
        Fake {
            memory_mib: 4096,
            next_pid: AtomicI32::new(100),
            ..Fake::default()
        }
    }
    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = self.running.lock().unwrap().iter().cloned().collect();
        v.sort();
        v
    }
}

#[tonic::async_trait]
impl VmBackend for Fake {
    fn images(&self) -> Vec<String> {
        vec!["debian-ci".into(), "alpine".into()]
    }
    fn available_memory_mib(&self) -> u64 {
        self.memory_mib
    }
    async fn create(&self, spec: &VmSpec) -> Result<VmRecord, BackendError> {
        if let Some(b) = &self.barrier {
            b.wait().await;
        }
        if let Some(make) = *self.create_error.lock().unwrap() {
            return Err(make(format!("{} did not come up", spec.id)));
        }
        self.running.lock().unwrap().insert(spec.id.clone());
        Ok(VmRecord {
            id: spec.id.clone(),
            slot: spec.slot,
            image: spec.image.clone(),
            pid: self.next_pid.fetch_add(1, Ordering::Relaxed),
            start_time: 1,
            addr: format!("10.77.{}.2:22", spec.slot),
        })
    }
    async fn destroy(&self, vm: &VmRecord) -> Result<(), BackendError> {
        if self.fail_destroy.lock().unwrap().contains(&vm.id) {
            return Err(BackendError::Failed("kill: operation not permitted".into()));
        }
        self.running.lock().unwrap().remove(&vm.id);
        self.destroyed.lock().unwrap().push(vm.id.clone());
        Ok(())
    }
    fn alive(&self, vm: &VmRecord) -> bool {
        self.running.lock().unwrap().contains(&vm.id)
    }
    async fn sweep(&self, keep: &[VmRecord]) -> Vec<String> {
        let mut running = self.running.lock().unwrap();
        let mut gone: Vec<String> = running
            .iter()
            .filter(|id| !keep.iter().any(|vm| &vm.id == *id))
            .cloned()
            .collect();
        gone.sort();
        for id in &gone {
            running.remove(id);
        }
        self.destroyed.lock().unwrap().extend(gone.iter().cloned());
        gone
    }
}
