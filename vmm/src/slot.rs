//! cgroup v2 slots: `--slot N` runs the VM in `<cgroup root>/kiln/slot-N`, with limits on
//! memory (guest RAM plus the VMM's overhead), processes and, where the kernel has CFS
//! bandwidth control, CPU. A slot holds one VM: starting a VM in an occupied slot stops
//! the previous occupant first (SIGTERM, then SIGKILL after a grace period), as GitLab's
//! taskscaler expects of a slot it hands out again.
//!
//! The kiln process moves itself into the slot before it maps guest memory or starts a
//! thread, so that everything the VM uses is charged to the slot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where cgroup v2 is mounted, unless `KILN_CGROUP_ROOT` says otherwise.
const DEFAULT_ROOT: &str = "/sys/fs/cgroup";
/// Memory the VMM itself may use on top of guest RAM (its heap, stacks, page tables, the
/// host side of device I/O).
pub const OVERHEAD_MIB: u64 = 64;
/// Threads and processes a slot may hold: vCPUs, the event loop, API and helper threads.
const PIDS_MAX: u32 = 128;
/// How long the previous occupant gets between SIGTERM and SIGKILL.
const STOMP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("--slot needs cgroup v2 mounted at {0} (no cgroup.controllers there); mount it with `mount -t cgroup2 none {0}` or set KILN_CGROUP_ROOT")]
    NoCgroup2(PathBuf),
    #[error("slot {slot}: cannot {what} {}: {source}", path.display())]
    Io {
        slot: u32,
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("slot {slot}: the previous occupant (pids {pids:?}) did not go away")]
    Stuck { slot: u32, pids: Vec<i32> },
}

/// The limits of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLimits {
    pub memory_mib: u64,
    pub vcpus: u8,
}

impl SlotLimits {
    /// Guest RAM plus [`OVERHEAD_MIB`].
    pub fn for_guest(memory_mib: u64, vcpus: u8) -> Self {
        SlotLimits {
            memory_mib: memory_mib + OVERHEAD_MIB,
            vcpus,
        }
    }
}

/// The slot this process runs in.
#[derive(Debug)]
pub struct Slot {
    pub number: u32,
    pub dir: PathBuf,
}

impl Slot {
    /// Stops whatever occupies slot `number`, sets its limits and moves this process in.
    pub fn enter(number: u32, limits: SlotLimits) -> Result<Slot, SlotError> {
        let root = std::env::var_os("KILN_CGROUP_ROOT")
            .map_or_else(|| PathBuf::from(DEFAULT_ROOT), PathBuf::from);
        Self::enter_at(&root, number, limits)
    }

    /// [`Slot::enter`] with cgroup v2 mounted at `root`.
    pub(crate) fn enter_at(
        root: &Path,
        number: u32,
        limits: SlotLimits,
    ) -> Result<Slot, SlotError> {
        let root = root.to_owned();
        if !root.join("cgroup.controllers").exists() {
            return Err(SlotError::NoCgroup2(root));
        }
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| SlotError::Io {
                slot: number,
                what,
                path,
                source,
            }
        };
        let kiln = root.join("kiln");
        std::fs::create_dir_all(&kiln).map_err(io("create", &kiln))?;
        for dir in [&root, &kiln] {
            enable_controllers(dir);
        }
        let dir = kiln.join(format!("slot-{number}"));
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let slot = Slot { number, dir };
        slot.stomp()?;
        slot.set_limits(limits)?;
        let procs = slot.dir.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .map_err(io("move this process into", &procs))?;
        tracing::info!("running in cgroup slot {} ({})", number, slot.dir.display());
        Ok(slot)
    }

    /// The processes in the slot now.
    fn occupants(&self) -> Result<Vec<i32>, SlotError> {
        let procs = self.dir.join("cgroup.procs");
        let text = std::fs::read_to_string(&procs).map_err(|source| SlotError::Io {
            slot: self.number,
            what: "read",
            path: procs,
            source,
        })?;
        let me = i32::try_from(std::process::id()).unwrap_or(0);
        Ok(text
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|&pid| pid != me)
            .collect())
    }

    /// Stops the previous occupant: SIGTERM, then SIGKILL after [`STOMP_GRACE`]; waits
    /// (bounded) until the slot is empty.
    fn stomp(&self) -> Result<(), SlotError> {
        let pids = self.occupants()?;
        if pids.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            "slot {} is occupied by pids {pids:?}: stopping them (SIGTERM, then SIGKILL after {STOMP_GRACE:?})",
            self.number
        );
        signal_all(&pids, libc::SIGTERM);
        if self.wait_empty(STOMP_GRACE)? {
            return Ok(());
        }
        signal_all(&self.occupants()?, libc::SIGKILL);
        if self.wait_empty(STOMP_GRACE)? {
            return Ok(());
        }
        Err(SlotError::Stuck {
            slot: self.number,
            pids: self.occupants()?,
        })
    }

    fn wait_empty(&self, within: Duration) -> Result<bool, SlotError> {
        let deadline = Instant::now() + within;
        loop {
            if self.occupants()?.is_empty() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            // cgroup.events could be watched with inotify; a short poll is simpler.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn set_limits(&self, limits: SlotLimits) -> Result<(), SlotError> {
        self.write("memory.max", &(limits.memory_mib << 20).to_string())?;
        // No swap: a VM over its limit is killed, not slowed to a crawl.
        self.write_if_present("memory.swap.max", "0")?;
        self.write("pids.max", &PIDS_MAX.to_string())?;
        let quota = u64::from(limits.vcpus.max(1)) * 100_000;
        if !self.write_if_present("cpu.max", &format!("{quota} 100000"))? {
            tracing::warn!(
                "slot {}: no cpu.max (the kernel lacks CFS bandwidth control); CPU is not limited",
                self.number
            );
        }
        Ok(())
    }

    fn write(&self, file: &str, value: &str) -> Result<(), SlotError> {
        let path = self.dir.join(file);
        std::fs::write(&path, value).map_err(|source| SlotError::Io {
            slot: self.number,
            what: "write",
            path,
            source,
        })
    }

    /// Writes `file` if the kernel offers it; returns whether it did.
    fn write_if_present(&self, file: &str, value: &str) -> Result<bool, SlotError> {
        if !self.dir.join(file).exists() {
            return Ok(false);
        }
        self.write(file, value).map(|()| true)
    }
}

/// Turns on the cpu, memory and pids controllers for `dir`'s children, each on its own
/// (one the kernel lacks must not stop the others); the limits written later say what
/// is missing.
fn enable_controllers(dir: &Path) {
    for controller in ["+memory", "+pids", "+cpu"] {
        if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), controller) {
            tracing::debug!("{}: cannot enable {controller}: {e}", dir.display());
        }
    }
}

fn signal_all(pids: &[i32], signo: i32) {
    for &pid in pids {
        // SAFETY: kill only sends a signal; the pids are processes the slot holds.
        unsafe { libc::kill(pid, signo) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_add_the_overhead() {
        assert_eq!(
            SlotLimits::for_guest(256, 2),
            SlotLimits {
                memory_mib: 256 + OVERHEAD_MIB,
                vcpus: 2
            }
        );
    }

    #[test]
    fn a_root_without_cgroup2_is_a_clear_error() {
        let dir = crate::test_util::scratch("slot");
        // A plain directory is not a cgroup2 mount.
        let e = Slot::enter_at(&dir, 1, SlotLimits::for_guest(16, 1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cgroup v2") && e.contains("mount -t cgroup2"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
