//! The VMs kiln runs on this host with a control API, for `kiln ps`: each such kiln writes
//! one record (`<pid>.json`) into the registry directory while its VM runs and removes it
//! when the VM ends. A record whose process is gone, or whose pid now names another
//! process (a different start time), is stale: `kiln ps` skips it and removes it if it can.
//!
//! The directory: `$KILN_RUN_DIR`, else `/run/kiln/vms` for root, else
//! `$XDG_RUNTIME_DIR/kiln/vms`; created 0700. A kiln with none of these (a VMM in
//! `kiln jail`, which runs as its own uid with a cleared environment) keeps no record: it
//! writes nothing into the jail's root.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One running VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub pid: u32,
    /// The process's start time in clock ticks since boot (`/proc/<pid>/stat`, field 22):
    /// with the pid, names the process even after the pid is reused.
    pub start_ticks: u64,
    /// When the VM started, seconds since the epoch.
    pub started_unix: u64,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// The control API socket.
    pub api: PathBuf,
    /// The vsock socket, if the VM has a vsock device.
    pub vsock: Option<PathBuf>,
    /// The snapshot the VM was restored from, if it was.
    pub snapshot: Option<PathBuf>,
}

/// The registry directory for this user, if it has one.
pub fn dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("KILN_RUN_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    if unsafe { libc::getuid() } == 0 {
        return Some(PathBuf::from("/run/kiln/vms"));
    }
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d).join("kiln/vms"))
}

/// The start time of process `pid` in clock ticks since boot, if it runs.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (comm) is in parentheses and may hold spaces: count from after its end.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Fields 3.. follow; the start time is field 22, the 20th after comm.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// A record in the registry, removed when dropped.
pub struct Registration {
    path: PathBuf,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Records this process's VM in the registry directory `dir`.
pub fn register(dir: &Path, mut record: VmRecord) -> std::io::Result<Registration> {
    kiln_devices::private::ensure_dir(dir)?;
    record.pid = std::process::id();
    record.start_ticks = start_ticks(record.pid).unwrap_or(0);
    record.started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = dir.join(format!("{}.json", record.pid));
    // A record left by an earlier process with this pid is stale: replace it.
    let _ = std::fs::remove_file(&path);
    let mut file = kiln_devices::private::create_file(&path)?;
    serde_json::to_writer(&mut file, &record)?;
    Ok(Registration { path })
}

/// The VMs whose kiln still runs, by pid; stale records are removed where possible.
pub fn list(dir: &Path) -> Vec<VmRecord> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut vms: Vec<VmRecord> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| {
            let record = std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<VmRecord>(&b).ok());
            match record {
                Some(r) if start_ticks(r.pid) == Some(r.start_ticks) => Some(r),
                _ => {
                    let _ = std::fs::remove_file(e.path());
                    None
                }
            }
        })
        .collect();
    vms.sort_by_key(|r| r.pid);
    vms
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> VmRecord {
        VmRecord {
            pid: 0,
            start_ticks: 0,
            started_unix: 0,
            vcpus: 2,
            memory_mib: 256,
            api: PathBuf::from("/x/api.sock"),
            vsock: None,
            snapshot: None,
        }
    }

    #[test]
    fn a_registered_vm_is_listed_until_its_record_goes_and_stale_ones_are_dropped() {
        let dir = std::env::temp_dir().join(format!("kiln-registry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let registration = register(&dir, record()).unwrap();
        let listed = list(&dir);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].pid, std::process::id());
        assert_eq!(listed[0].memory_mib, 256);
        // A record of a process that is not running (pid 0 never is a user process), and
        // one of this pid with another start time, are stale.
        let stale = VmRecord {
            pid: u32::MAX - 1,
            ..record()
        };
        std::fs::write(
            dir.join("4294967294.json"),
            serde_json::to_vec(&stale).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.join("garbage.json"), b"{").unwrap();
        assert_eq!(list(&dir).len(), 1);
        assert!(!dir.join("4294967294.json").exists());
        assert!(!dir.join("garbage.json").exists());
        drop(registration);
        assert!(list(&dir).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn start_ticks_reads_field_22_past_a_comm_with_spaces() {
        assert!(start_ticks(std::process::id()).is_some());
        assert_eq!(start_ticks(u32::MAX - 1), None);
    }
}
