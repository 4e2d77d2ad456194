//! `vmm_memory`: the kiln process's own memory, beside the guest's, on the direct path.
//!
//! A spinning tiny guest with 128 MiB runs under `kiln run --api`; once the API answers,
//! `/proc/<pid>/smaps` is read. Guest RAM is the anonymous mapping of exactly the guest's
//! size; the VMM's overhead is the rest of its proportional set size: heap, stacks, and its
//! share of the binary's pages.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use crate::kiln_process::{ctl, spin_kernel, start_spinning_vm};
use crate::stats;

pub fn run(kiln: &Path, runs: usize) -> Result<Vec<Value>> {
    let dir = kiln_tests::tmp::TempDir::new("bench-vmm-memory")?;
    let kernel = spin_kernel(dir.path())?;
    let (mut overhead, mut rss) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let api = dir.path().join(format!("api-{i}.sock"));
        let child = start_spinning_vm(kiln, &kernel, &api)?;
        // The API answering means the VM is built and running.
        ctl(kiln, &api, "status")?;
        let pid = child.id().context("no pid")?;
        let smaps =
            std::fs::read_to_string(format!("/proc/{pid}/smaps")).context("reading smaps")?;
        let usage = Usage::of(&smaps, GUEST_MIB << 10)?;
        let mib = |kib: u64| kib as f64 / 1024.0;
        overhead.push(mib(usage.pss_kib - usage.guest_pss_kib));
        rss.push(mib(usage.rss_kib));
        ctl(kiln, &api, "shutdown")?;
        let out = child.finish()?;
        if !out.status.success() {
            bail!("kiln run failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let mut extra = Map::new();
    extra.insert(
        "guest".into(),
        "tiny ELF kernel (spinning), 1 vCPU, 128 MiB".into(),
    );
    extra.insert("median_rss_mib".into(), stats::summary(&rss).0.into());
    Ok(vec![stats::result(
        "vmm_memory",
        "direct",
        "mib",
        &overhead,
        extra,
    )])
}

/// The guest's RAM in MiB, as `start_spinning_vm` gives it.
const GUEST_MIB: u64 = 128;

/// A process's memory from its `/proc/PID/smaps`, in KiB.
#[derive(Debug, PartialEq)]
struct Usage {
    pss_kib: u64,
    rss_kib: u64,
    /// Pss of the guest's RAM: anonymous mappings (no path) of exactly its size.
    guest_pss_kib: u64,
}

impl Usage {
    fn of(smaps: &str, guest_kib: u64) -> Result<Usage> {
        let mut usage = Usage {
            pss_kib: 0,
            rss_kib: 0,
            guest_pss_kib: 0,
        };
        let (mut anonymous, mut size, mut guest_regions) = (false, 0, 0);
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let Some(first) = words.next() else {
                continue;
            };
            if !first.ends_with(':') {
                // A mapping's header: address range, perms, offset, dev, inode[, path].
                anonymous = words.nth(3).is_some() && words.next().is_none();
                continue;
            }
            let kib = || -> Result<u64> {
                line[first.len()..]
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .with_context(|| format!("bad smaps line {line:?}"))
            };
            match first {
                "Size:" => size = kib()?,
                "Rss:" => usage.rss_kib += kib()?,
                "Pss:" => {
                    usage.pss_kib += kib()?;
                    if anonymous && size == guest_kib {
                        usage.guest_pss_kib += kib()?;
                        guest_regions += 1;
                    }
                }
                _ => {}
            }
        }
        if guest_regions != 1 {
            bail!("found {guest_regions} anonymous mappings of the guest's {guest_kib} KiB, not 1");
        }
        Ok(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_mapping_is_told_apart() {
        let smaps = "\
55d0-55e0 r-xp 00000000 fd:01 123 /usr/bin/kiln
Size:                 64 kB
Rss:                  60 kB
Pss:                  30 kB
7f00-7f80 rw-p 00000000 00:00 0 
Size:             131072 kB
Rss:                  16 kB
Pss:                  16 kB
7f90-7fa0 rw-p 00000000 00:00 0 [heap]
Size:               2048 kB
Rss:                 900 kB
Pss:                 900 kB
";
        let usage = Usage::of(smaps, 131072).unwrap();
        assert_eq!(usage.pss_kib, 946);
        assert_eq!(usage.rss_kib, 976);
        assert_eq!(usage.guest_pss_kib, 16);
        assert!(Usage::of(smaps, 4096).is_err());
    }
}
