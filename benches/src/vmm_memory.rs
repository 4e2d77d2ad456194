//! `vmm_memory`: the kiln process's own memory, beside the guest's, on the direct path.
//!
//! A spinning tiny guest with 128 MiB runs under `kiln run --api`; once the API answers,
//! `/proc/<pid>/smaps_rollup` is read. Guest RAM is a shared memfd mapping, so it shows as
//! shmem; the VMM's overhead is the rest of its proportional set size (Pss − Pss_Shmem):
//! heap, stacks, and its share of the binary's pages.

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
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .context("reading smaps_rollup")?;
        let kib = |key: &str| -> Result<f64> {
            smaps
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .with_context(|| format!("no {key} in smaps_rollup"))
        };
        overhead.push((kib("Pss")? - kib("Pss_Shmem")?) / 1024.0);
        rss.push(kib("Rss")? / 1024.0);
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
