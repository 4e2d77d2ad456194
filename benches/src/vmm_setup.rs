//! `vmm_setup`: from the kiln process's start to its first KVM_RUN, on the direct path.
//!
//! The guest is the tiny ELF kernel (`kiln_tests::tiny_kernel`), which resets at once, so
//! each run measures kiln's own set-up: config, memory, KVM VM and vCPU, kernel load.

use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use crate::stats;

pub fn run(kiln: &std::path::Path, runs: usize) -> Result<Vec<Value>> {
    let dir = kiln_tests::tmp::TempDir::new("bench-vmm-setup")?;
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, kiln_tests::tiny_kernel::build(""))?;
    let mut setup = Vec::with_capacity(runs);
    let mut total = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = std::time::Instant::now();
        let out = Command::new(kiln)
            .args([
                "run", "--memory", "128", "--serial", "null", "--json", "--kernel",
            ])
            .arg(&kernel)
            .output()
            .context("running kiln")?;
        let wall = started.elapsed();
        if !out.status.success() {
            bail!("kiln run failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let report = last_json_line(&String::from_utf8_lossy(&out.stdout))?;
        setup.push(
            report["setup_ms"]
                .as_f64()
                .context("no setup_ms in kiln's report")?,
        );
        total.push(wall.as_secs_f64() * 1e3);
    }
    let mut extra = Map::new();
    extra.insert("guest".into(), "tiny ELF kernel, 1 vCPU, 128 MiB".into());
    extra.insert("median_process_ms".into(), stats::summary(&total).0.into());
    Ok(vec![stats::result(
        "vmm_setup",
        "direct",
        "ms",
        &setup,
        extra,
    )])
}

/// The JSON report `kiln run --json` prints as its last stdout line.
pub fn last_json_line(stdout: &str) -> Result<Value> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("kiln printed no JSON report")?;
    serde_json::from_str(line).with_context(|| format!("bad JSON report: {line}"))
}
