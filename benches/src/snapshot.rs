//! `snapshot` and `restore`: snapshots of a real guest, timed in one
//! test-bed boot (or directly on a host with hardware virtualization). The guest is the
//! agent image (no rc script), 1 vCPU, 256 MiB, booted with `kiln run --vsock --api`.
//!
//! - `snapshot`: `kiln ctl snapshot --dir D` (resuming after each), process start to exit,
//!   in ms; `memory_mib` is the memory file's allocated size (`du -m`, median).
//! - `restore`: from the start of `kiln restore --snapshot D --vsock V` to the first
//!   `kiln exec --vsock V -- true` that succeeds (retried every 20 ms), in ms.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln_tests::Runner;
use serde_json::{Map, Value};

use crate::stats;
use crate::vsock::{agent_files, run_script, CLOCK_SH};

/// What to measure.
pub struct Params {
    /// Samples of `snapshot` (0: skip it).
    pub snapshot_runs: usize,
    /// Samples of `restore` (0: skip it).
    pub restore_runs: usize,
}

pub fn run(runner: &Runner, p: &Params) -> Result<Vec<Value>> {
    ensure!(p.snapshot_runs + p.restore_runs > 0, "nothing to measure");
    // A snapshot is needed for restore even when `snapshot` is not measured.
    let snap_runs = p.snapshot_runs.max(1);
    let restore_runs = p.restore_runs;
    let script = format!(
        r#"set -e
{CLOCK_SH}
D="$PWD"
# ready SOCK PID: retries `kiln exec -- true` (bounded) while PID lives.
ready() {{
  i=0
  until timeout 10 "$KILN" exec --vsock "$1" -- true 2>/dev/null; do
    i=$((i + 1))
    if [ $i -ge 1500 ] || ! kill -0 $2 2>/dev/null; then echo "$1 not ready"; return 1; fi
    sleep 0.02
  done
}}
"$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --vcpus 1 --memory 256 \
  --vsock "$D/v.sock" --api "$D/api.sock" --serial null 2> run.err &
vm=$!
ready "$D/v.sock" $vm || {{ cat run.err; exit 1; }}
r=0
while [ $r -lt {snap_runs} ]; do
  a=$(now_us)
  "$KILN" ctl --api "$D/api.sock" snapshot --dir "$D/snap$r" > /dev/null
  b=$(now_us)
  echo "BENCH-SNAPSHOT $((b - a)) $(du -m "$D/snap$r/memory" | cut -f1)"
  [ $r -eq 0 ] || rm -r "$D/snap$r"
  r=$((r + 1))
done
"$KILN" ctl --api "$D/api.sock" shutdown > /dev/null
wait $vm
r=0
while [ $r -lt {restore_runs} ]; do
  a=$(now_us)
  "$KILN" restore --snapshot "$D/snap0" --vsock "$D/r.sock" --api "$D/rapi.sock" \
    --serial null 2> restore.err &
  c=$!
  ready "$D/r.sock" $c || {{ cat restore.err; exit 1; }}
  b=$(now_us)
  echo "BENCH-RESTORE $((b - a))"
  "$KILN" ctl --api "$D/rapi.sock" shutdown > /dev/null
  wait $c
  r=$((r + 1))
done
echo "BENCH-LEFT $(pidof kiln | wc -w)"
"#
    );
    let files = agent_files()?;
    let timeout = Duration::from_secs(120 + 10 * (snap_runs + restore_runs) as u64);
    let (out, clock) = run_script(runner, "snapshot", &script, &files, timeout)?;
    let (mut snap_ms, mut snap_mib, mut restore_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut left = None;
    for line in out.console.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> Result<f64> {
            words
                .get(i)
                .with_context(|| format!("short line {line:?}"))?
                .parse::<f64>()
                .with_context(|| format!("bad number in {line:?}"))
        };
        match words.first() {
            Some(&"BENCH-SNAPSHOT") => {
                snap_ms.push(num(1)? / 1e3);
                snap_mib.push(num(2)?);
            }
            Some(&"BENCH-RESTORE") => restore_ms.push(num(1)? / 1e3),
            Some(&"BENCH-LEFT") => left = Some(num(1)?),
            _ => {}
        }
    }
    ensure!(
        snap_ms.len() == snap_runs && restore_ms.len() == restore_runs,
        "expected {snap_runs} snapshot and {restore_runs} restore samples:\n{}",
        out.console
    );
    ensure!(
        left == Some(0.0),
        "kiln processes left running:\n{}",
        out.console
    );
    let guest = "guest vmlinux + agent initramfs (no rc), 1 vCPU, 256 MiB";
    let base = |what: &str| {
        let mut extra = Map::new();
        extra.insert("what".into(), what.into());
        extra.insert("guest".into(), guest.into());
        extra.insert("clock".into(), clock.clone().into());
        extra
    };
    let mut results = Vec::new();
    if p.snapshot_runs > 0 {
        let mut extra = base("kiln ctl snapshot --dir D of a booted guest, process start to exit");
        extra.insert("memory_mib".into(), stats::summary(&snap_mib).0.into());
        results.push(stats::result(
            "snapshot",
            runner.path_name(),
            "ms",
            &snap_ms,
            extra,
        ));
    }
    if restore_runs > 0 {
        results.push(stats::result(
            "restore",
            runner.path_name(),
            "ms",
            &restore_ms,
            base("kiln restore start to the first kiln exec -- true that succeeds"),
        ));
    }
    Ok(results)
}
