//! The runner-facing rules of the nesting server, independent of how VMs are run: lazy
//! Init, slot bookkeeping with the stomp, the exact error codes and messages GitLab Runner
//! matches, and finding the VMs again after a restart.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Deserialize;
use tonic::Status;

use super::backend::{BackendError, VmBackend, VmRecord, VmSpec};
use super::records::Records;

/// The runner matches these two messages byte for byte (with FAILED_PRECONDITION): it
/// calls Init only after a call failed with the first, and tolerates the second.
pub const NOT_INITIALIZED: &str = "not initialized";
pub const ALREADY_INITIALIZED: &str = "already initialized";

/// Memory the VMM itself needs besides the guest's (the slot cgroup's default headroom).
pub const VMM_OVERHEAD_MIB: u64 = 64;

/// The server's own settings: defaults that Init's `nesting_config` may override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Slots 0 … slots−1 are accepted.
    pub slots: u32,
    pub memory_mib: u64,
    pub vcpus: u64,
    pub ssh_user: String,
    pub ssh_password: Option<String>,
}

/// The runner's `[runners.autoscaler.vm_isolation.nesting_config]`, as Init's JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    pub ssh_user: Option<String>,
    pub ssh_password: Option<String>,
    pub memory_mib: Option<u64>,
    pub vcpus: Option<u64>,
}

impl InitConfig {
    /// Init's bytes: the JSON of the table, or `null` / nothing when the runner has none.
    pub fn parse(bytes: &[u8]) -> Result<InitConfig, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("config is not UTF-8: {e}"))?;
        if text.trim().is_empty() || text.trim() == "null" {
            return Ok(InitConfig::default());
        }
        serde_json::from_str(text).map_err(|e| {
            format!("nesting_config: {e} (known keys: ssh_user, ssh_password, memory_mib, vcpus)")
        })
    }
}

#[derive(Debug, Default)]
struct State {
    init: Option<InitConfig>,
    vms: BTreeMap<String, VmRecord>,
    /// Which VM each slot holds. A slot whose VM could not be stomped keeps it here.
    slots: BTreeMap<i32, String>,
    /// Memory promised to Creates still booting.
    reserved_mib: u64,
}

/// The nesting server's state and operations; [`super::service`] puts gRPC around it.
pub struct Provider<B> {
    backend: Arc<B>,
    records: Records,
    settings: Settings,
    state: Mutex<State>,
    /// One lock per slot, held across a Create's stomp and boot (and a Delete), so that
    /// Creates in different slots run side by side.
    slot_locks: Mutex<HashMap<i32, Arc<tokio::sync::Mutex<()>>>>,
    counter: AtomicU64,
}

impl<B: VmBackend> Provider<B> {
    pub fn new(backend: Arc<B>, records: Records, settings: Settings) -> Provider<B> {
        Provider {
            backend,
            records,
            settings,
            state: Mutex::new(State::default()),
            slot_locks: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot_lock(&self, slot: i32) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.slot_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(slot).or_default().clone()
    }

    /// Takes back the VMs of the records on disk that still run; the records (and
    /// leftovers) of those that do not are removed, and so is every VM the backend runs
    /// without a record. Returns how many were recovered.
    pub async fn recover(&self) -> std::io::Result<usize> {
        let mut dead = Vec::new();
        {
            let mut st = self.state();
            for vm in self.records.load()? {
                if self.backend.alive(&vm) && !st.slots.contains_key(&vm.slot) {
                    st.slots.insert(vm.slot, vm.id.clone());
                    st.vms.insert(vm.id.clone(), vm);
                } else {
                    dead.push(vm);
                }
            }
        }
        for vm in dead {
            self.forget_dead(&vm).await;
        }
        // VMs of Creates the previous server never finished have no record: they go too.
        let live: Vec<VmRecord> = self.state().vms.values().cloned().collect();
        for id in self.backend.sweep(&live).await {
            eprintln!("nesting: destroyed the VM {id} of an unfinished Create");
        }
        Ok(self.state().vms.len())
    }

    /// Cleans up after a VM that is no longer running.
    async fn forget_dead(&self, vm: &VmRecord) {
        if let Err(e) = self.backend.destroy(vm).await {
            eprintln!("nesting: cleaning up after the dead VM {}: {e}", vm.id);
        }
        if let Err(e) = self.records.remove(&vm.id) {
            eprintln!("nesting: removing the record of {}: {e}", vm.id);
        }
        let mut st = self.state();
        st.vms.remove(&vm.id);
        if st.slots.get(&vm.slot) == Some(&vm.id) {
            st.slots.remove(&vm.slot);
        }
    }

    // tonic's `Status` is large, but it is what every call answers with.
    #[allow(clippy::result_large_err)]
    fn initialized(&self) -> Result<InitConfig, Status> {
        self.state()
            .init
            .clone()
            .ok_or_else(|| Status::failed_precondition(NOT_INITIALIZED))
    }

    #[allow(clippy::result_large_err)]
    pub fn init(&self, config: &[u8]) -> Result<(), Status> {
        let mut st = self.state();
        if st.init.is_some() {
            return Err(Status::failed_precondition(ALREADY_INITIALIZED));
        }
        let config = InitConfig::parse(config).map_err(Status::invalid_argument)?;
        if config.memory_mib == Some(0) || config.vcpus == Some(0) {
            return Err(Status::invalid_argument(
                "nesting_config: memory_mib and vcpus must be at least 1",
            ));
        }
        st.init = Some(config);
        Ok(())
    }

    /// Creates a VM of image `name` in `slot`, first destroying the VM the slot holds.
    /// Returns the new VM and the id of the stomped one.
    pub async fn create(
        &self,
        name: &str,
        slot: Option<i32>,
    ) -> Result<(VmRecord, Option<String>), Status> {
        let init = self.initialized()?;
        let slot = match slot {
            Some(s) => s,
            // The runner always sends one; without, take the lowest slot holding nothing.
            None => {
                let st = self.state();
                (0..self.slots())
                    .find(|s| !st.slots.contains_key(s))
                    .ok_or_else(|| {
                        Status::resource_exhausted(format!(
                            "all {} slots hold a VM",
                            self.settings.slots
                        ))
                    })?
            }
        };
        if slot < 0 || slot >= self.slots() {
            return Err(Status::invalid_argument(format!(
                "slot {slot} is out of range: this server has slots 0 to {} (its `slots` \
                 setting; the runner's capacity_per_instance must not be larger)",
                self.slots() - 1
            )));
        }
        if let Err(e) = crate::store::check_name("image", name) {
            return Err(Status::invalid_argument(e.to_string()));
        }
        let images = self.backend.images();
        if !images.iter().any(|i| i == name) {
            let list = if images.is_empty() {
                "(none)".to_string()
            } else {
                images.join(", ")
            };
            return Err(Status::not_found(format!(
                "no image {name:?}; the images there are: {list}"
            )));
        }

        let lock = self.slot_lock(slot);
        let _held = lock.lock().await;

        // The stomp: the slot's previous VM goes first. If it cannot be destroyed, the
        // slot keeps it, so that the runner's next Create in this slot tries again.
        let old = {
            let st = self.state();
            st.slots.get(&slot).and_then(|id| st.vms.get(id)).cloned()
        };
        let stomped = match old {
            Some(old) => {
                self.backend.destroy(&old).await.map_err(|e| {
                    Status::internal(format!(
                        "cannot delete the VM {} that slot {slot} holds: {e}",
                        old.id
                    ))
                })?;
                self.drop_vm(&old);
                Some(old.id)
            }
            None => None,
        };

        let memory_mib = init.memory_mib.unwrap_or(self.settings.memory_mib);
        let vcpus = init.vcpus.unwrap_or(self.settings.vcpus);
        let need = memory_mib + VMM_OVERHEAD_MIB;
        {
            let mut st = self.state();
            let available = self
                .backend
                .available_memory_mib()
                .saturating_sub(st.reserved_mib);
            if need > available {
                return Err(Status::resource_exhausted(format!(
                    "not enough memory for a VM of {memory_mib} MiB (+{VMM_OVERHEAD_MIB} MiB \
                     for its VMM): {available} MiB available"
                )));
            }
            st.reserved_mib += need;
        }
        let spec = VmSpec {
            id: self.new_id(slot),
            slot,
            image: name.to_string(),
            memory_mib,
            vcpus,
            ssh_user: init
                .ssh_user
                .clone()
                .unwrap_or_else(|| self.settings.ssh_user.clone()),
            ssh_password: match init
                .ssh_password
                .clone()
                .or(self.settings.ssh_password.clone())
            {
                Some(p) => p,
                None => {
                    self.state().reserved_mib -= need;
                    return Err(Status::failed_precondition(
                        "no SSH password for the VM: set ssh_password in the runner's \
                         nesting_config (the same as vm_isolation.connector_config's password) \
                         or in the server's config",
                    ));
                }
            },
        };
        let created = self.backend.create(&spec).await;
        self.state().reserved_mib -= need;
        let vm = created.map_err(|e| match e {
            BackendError::Timeout(m) => Status::deadline_exceeded(m),
            BackendError::Failed(m) => Status::internal(m),
        })?;
        if let Err(e) = self.records.save(&vm) {
            // A VM the server could not remember would leak across a restart: undo it.
            let _ = self.backend.destroy(&vm).await;
            return Err(Status::internal(format!("cannot record the VM: {e}")));
        }
        let mut st = self.state();
        st.slots.insert(slot, vm.id.clone());
        st.vms.insert(vm.id.clone(), vm.clone());
        Ok((vm, stomped))
    }

    fn slots(&self) -> i32 {
        i32::try_from(self.settings.slots).unwrap_or(i32::MAX)
    }

    fn new_id(&self, slot: i32) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("kiln-s{slot}-{nanos:x}-{n}")
    }

    /// Forgets a destroyed VM: its record, and its slot if the slot still points at it.
    fn drop_vm(&self, vm: &VmRecord) {
        if let Err(e) = self.records.remove(&vm.id) {
            eprintln!("nesting: removing the record of {}: {e}", vm.id);
        }
        let mut st = self.state();
        st.vms.remove(&vm.id);
        if st.slots.get(&vm.slot) == Some(&vm.id) {
            st.slots.remove(&vm.slot);
        }
    }

    pub async fn delete(&self, id: &str) -> Result<(), Status> {
        self.initialized()?;
        let slot = self.state().vms.get(id).map(|vm| vm.slot);
        let Some(slot) = slot else {
            return Err(Status::not_found(format!("no VM with id {id:?}")));
        };
        let lock = self.slot_lock(slot);
        let _held = lock.lock().await;
        // Looked up again: a Create in this slot may have stomped it meanwhile.
        let Some(vm) = self.state().vms.get(id).cloned() else {
            return Err(Status::not_found(format!("no VM with id {id:?}")));
        };
        self.backend
            .destroy(&vm)
            .await
            .map_err(|e| Status::internal(format!("cannot delete the VM {id}: {e}")))?;
        self.drop_vm(&vm);
        Ok(())
    }

    /// Every VM held that still runs; those found dead are forgotten, never reported.
    pub async fn list(&self) -> Result<Vec<VmRecord>, Status> {
        self.initialized()?;
        let vms: Vec<VmRecord> = self.state().vms.values().cloned().collect();
        let mut out = Vec::new();
        for vm in vms {
            if self.backend.alive(&vm) {
                out.push(vm);
            } else {
                eprintln!("nesting: VM {} (slot {}) has stopped", vm.id, vm.slot);
                self.forget_dead(&vm).await;
            }
        }
        Ok(out)
    }

    /// Destroys every VM held (the runner never calls it; an operator or the service
    /// manager may).
    pub async fn shutdown(&self) -> Result<(), Status> {
        let vms: Vec<VmRecord> = self.state().vms.values().cloned().collect();
        let mut failed = Vec::new();
        for vm in vms {
            let lock = self.slot_lock(vm.slot);
            let _held = lock.lock().await;
            match self.backend.destroy(&vm).await {
                Ok(()) => self.drop_vm(&vm),
                Err(e) => failed.push(format!("{}: {e}", vm.id)),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(Status::internal(format!(
                "cannot delete every VM: {}",
                failed.join("; ")
            )))
        }
    }
}

#[cfg(test)]
mod tests;
