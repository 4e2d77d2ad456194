//! `empty_job`: a whole `kiln job` of `true`, end to end — the kiln process's start, boot,
//! the script copied in and run, the VM stopped and cleaned up — timed from outside, where
//! the tests run. What a CI job costs before it does any work.

use std::time::Duration;

use anyhow::{bail, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::Runner;
use serde_json::{Map, Value};

use crate::stats;
use crate::vsock::{run_script, CLOCK_SH};

pub fn run(runner: &Runner, runs: usize) -> Result<Vec<Value>> {
    let script = format!(
        r#"{CLOCK_SH}
i=0
while [ $i -lt {runs} ]; do
  t0=$(now_us)
  "$KILN" job --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 128 \
    --script "$FILES/true.sh" --json > job.out 2> job.err
  rc=$?
  t1=$(now_us)
  [ $rc = 0 ] || {{ echo "kiln job exited $rc"; cat job.err; exit 1; }}
  echo "BENCH-EMPTY-JOB $((t1 - t0))"
  grep '^{{' job.err | sed 's/^/BENCH-EMPTY-JOB-REPORT /'
  i=$((i + 1))
done
"#
    );
    let files = vec![
        ("agent.cpio".to_string(), GuestInitramfs::new().build()?),
        ("true.sh".to_string(), b"true\n".to_vec()),
    ];
    let timeout = Duration::from_secs(120 + 60 * runs as u64);
    let (out, clock) = run_script(runner, "empty_job", &script, &files, timeout)?;
    let ms: Vec<f64> = out
        .console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("BENCH-EMPTY-JOB "))
        .filter_map(|us| us.trim().parse::<f64>().ok())
        .map(|us| us / 1000.0)
        .collect();
    if ms.len() != runs {
        bail!("expected {runs} jobs, got {}:\n{}", ms.len(), out.console);
    }
    // Where the time went, from kiln job's own report: boot (to the agent's mark) and the
    // job (script copied in and run); the rest is start-up and teardown.
    let reports: Vec<Value> = out
        .console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("BENCH-EMPTY-JOB-REPORT "))
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect();
    let median_of = |key: &str| {
        let v: Vec<f64> = reports.iter().filter_map(|r| r[key].as_f64()).collect();
        (!v.is_empty()).then(|| stats::summary(&v).0)
    };
    let mut extra = Map::new();
    extra.insert("median_boot_ms".into(), median_of("boot_ms").into());
    extra.insert("median_job_ms".into(), median_of("job_ms").into());
    extra.insert(
        "what".into(),
        "kiln job of `true`: process start to exit, VM booted and torn down".into(),
    );
    extra.insert(
        "guest".into(),
        "guest vmlinux + agent initramfs, 1 vCPU, 128 MiB".into(),
    );
    extra.insert("clock".into(), clock.into());
    Ok(vec![stats::result(
        "empty_job",
        runner.path_name(),
        "ms",
        &ms,
        extra,
    )])
}
