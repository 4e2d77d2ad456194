//! `docker`: how long `dockerd` takes from its start to its first answer on Docker's socket
//! in the guest, as `kiln job --docker` has the agent start it in the workload image
//! (Debian with `docker.io`, `kiln_tests::workload`). The agent measures it in the guest
//! and kiln reports it as `docker_ms` in its `--json` line.

use std::time::Duration;

use anyhow::{bail, Result};
use kiln_tests::workload;
use serde_json::{Map, Value};

use crate::stats;
use crate::vsock::run_script;

pub fn run(runs: usize) -> Result<Vec<Value>> {
    let image = workload::image()?;
    let runner = workload::runner()?;
    eprintln!(
        "bench docker: {runs} jobs with --docker in image {}, {}",
        image.name,
        runner.describe()
    );
    let script = format!(
        r#"
echo true > true.sh
i=0
while [ $i -lt {runs} ]; do
  "$KILN" job --kernel "$GUEST_VMLINUX" --image {name} --store "$FILES/store" \
    --memory {mem} --vcpus 2 --docker --docker-timeout 600 --json --script true.sh \
    > job.out 2> job.err
  rc=$?
  [ $rc = 0 ] || {{ echo "kiln job exited $rc"; cat job.err; exit 1; }}
  grep '^{{' job.err | sed 's/^/BENCH-DOCKER-REPORT /'
  i=$((i + 1))
done
"#,
        name = image.name,
        mem = workload::GUEST_MEMORY_MIB,
    );
    let files = image.files("store")?;
    let timeout = Duration::from_secs(600 + 600 * runs as u64);
    let (out, _clock) = run_script(&runner, "docker", &script, &files, timeout)?;
    let reports: Vec<Value> = out
        .console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("BENCH-DOCKER-REPORT "))
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect();
    let ms: Vec<f64> = reports
        .iter()
        .filter_map(|r| r["docker_ms"].as_f64())
        .collect();
    if ms.len() != runs {
        bail!(
            "expected {runs} reports with docker_ms, got {}:\n{}",
            ms.len(),
            out.console
        );
    }
    let boot: Vec<f64> = reports
        .iter()
        .filter_map(|r| r["boot_ms"].as_f64())
        .collect();
    let mut extra = Map::new();
    extra.insert(
        "median_boot_ms".into(),
        (!boot.is_empty()).then(|| stats::summary(&boot).0).into(),
    );
    extra.insert(
        "what".into(),
        "dockerd start to its first 200 on GET /_ping, measured in the guest".into(),
    );
    extra.insert(
        "guest".into(),
        format!(
            "workload image (Debian, docker.io), 2 vCPUs, {} MiB, root disk",
            workload::GUEST_MEMORY_MIB
        )
        .into(),
    );
    Ok(vec![stats::result(
        "docker",
        runner.path_name(),
        "ms",
        &ms,
        extra,
    )])
}
