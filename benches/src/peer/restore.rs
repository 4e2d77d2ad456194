//! `peer_restore`: a snapshot of the same booted guest under each VMM (kiln's guest vmlinux,
//! the agent initramfs, 1 vCPU, 128 MiB, a vsock device, no entropy device), then restores
//! taking turns: each timed from the VMM process's start until the guest's agent answers a
//! `kiln exec -- true` over the restored vsock socket. Firecracker's vsock speaks the same
//! host-side protocol as kiln's (`CONNECT <port>`), so one client serves both.
//!
//! kiln: `kiln run --vsock --api`, `kiln ctl snapshot`, then `kiln restore --snapshot`.
//! Firecracker: booted from a config file with its API socket, paused and snapshotted
//! (`PATCH /vm`, `PUT /snapshot/create`, full snapshot), then each restore is a new process
//! given `PUT /snapshot/load` with `resume_vm` (memory file mapped, as kiln maps its own).
//! The HTTP requests go through `kiln-benches uds-http` ([`super::uds_http`]), shipped
//! into the test bed with its libraries.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_tests::Runner;
use serde_json::Value;

use super::{firecracker, firecracker_file, peer_fields, skipped, uds_http, CMDLINE};
use crate::stats;
use crate::vmm_setup::last_json_line;
use crate::vsock::{agent_files, run_script, CLOCK_SH};

/// Seconds a boot or a restore may take until the agent answers.
const READY_DEADLINE_S: u64 = 120;

pub fn restore(runner: &Runner, runs: usize) -> Result<Vec<Value>> {
    let Some(firecracker) = firecracker() else {
        return Ok(vec![skipped("peer_restore")]);
    };
    let Samples {
        kiln,
        firecracker: fc,
        kiln_phases_ms,
    } = samples(runner, &firecracker, runs)?;
    let mut extra = peer_fields(&firecracker, &kiln, &fc);
    extra.insert("kiln_phases_ms".into(), kiln_phases_ms);
    extra.insert(
        "guest".into(),
        "guest vmlinux + agent initramfs, 1 vCPU, 128 MiB, vsock; process start to the agent \
         answering `kiln exec -- true`, alternating"
            .into(),
    );
    Ok(vec![stats::result(
        "peer_restore",
        runner.path_name(),
        "ms",
        &kiln,
        extra,
    )])
}

/// The restore times of each VMM, and kiln's own set-up phases.
struct Samples {
    kiln: Vec<f64>,
    firecracker: Vec<f64>,
    kiln_phases_ms: Value,
}

fn samples(runner: &Runner, firecracker: &Path, runs: usize) -> Result<Samples> {
    let http = uds_http::SUBCOMMAND;
    let script = format!(
        r#"
{CLOCK_SH}
cp -a "$FILES/peer-tools/." /
D="$PWD"
CMDLINE='{CMDLINE}'
alive() {{ [ -r /proc/$1/stat ] && ! grep -q '^[0-9]* ([^)]*) Z' /proc/$1/stat; }}
fail() {{
  echo "BENCH-FAIL $*"
  for f in run.err fc.out fcr.out restore.err; do [ -f $f ] && {{ echo "--- $f"; tail -n 20 $f; }}; done
  for p in $(pidof kiln firecracker); do kill -KILL $p 2>/dev/null; done
  exit 1
}}
# ready SOCK PID: once SOCK exists, retries `kiln exec -- true` on it while PID lives, for
# a bounded time. Each wait is 10 ms: polling flat out would take the test bed's CPUs from
# the VM being measured.
ready() {{
  deadline=$(($(now_us) + {READY_DEADLINE_S} * 1000000))
  until [ -S "$1" ] && timeout 5 "$KILN" exec --vsock "$1" -- true 2>/dev/null; do
    alive $2 || return 1
    [ $(now_us) -lt $deadline ] || return 1
    sleep 0.01
  done
}}
# stop PID: SIGKILL, then reap it.
stop() {{ kill -KILL $1 2>/dev/null; wait $1 2>/dev/null; true; }}
http() {{ /bin/peer-http {http} "$@"; }}

# kiln's snapshot.
"$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --cmdline "$CMDLINE" \
  --vcpus 1 --memory 128 --no-rng --vsock "$D/kv.sock" --api "$D/kapi.sock" --serial null 2> run.err &
vm=$!
ready "$D/kv.sock" $vm || fail "kiln's guest never answered"
"$KILN" ctl --api "$D/kapi.sock" snapshot --dir "$D/ksnap" --no-resume > /dev/null 2>> run.err \
  || fail "kiln snapshot failed"
stop $vm

# Firecracker's snapshot.
cat > fc.json <<EOF
{{"boot-source": {{"kernel_image_path": "$GUEST_VMLINUX", "initrd_path": "$FILES/agent.cpio",
                  "boot_args": "$CMDLINE"}},
 "drives": [], "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}},
 "vsock": {{"guest_cid": 3, "uds_path": "$D/fv.sock"}}}}
EOF
"$FILES/firecracker" --api-sock "$D/fapi.sock" --config-file fc.json --level Warn > fc.out 2>&1 &
vm=$!
ready "$D/fv.sock" $vm || fail "Firecracker's guest never answered"
http PATCH /vm "$D/fapi.sock" '{{"state": "Paused"}}' >> fc.out 2>&1 || fail "Firecracker pause failed"
http PUT /snapshot/create "$D/fapi.sock" \
  "{{\"snapshot_type\": \"Full\", \"snapshot_path\": \"$D/fsnap\", \"mem_file_path\": \"$D/fmem\"}}" \
  >> fc.out 2>&1 || fail "Firecracker snapshot failed"
stop $vm

i=0
while [ $i -lt {total} ]; do
  rm -f "$D/kr.sock" "$D/fv.sock" "$D/frapi.sock"
  if [ $((i % 2)) = 0 ]; then
    t0=$(now_us)
    "$KILN" restore --snapshot "$D/ksnap" --vsock "$D/kr.sock" --serial null --json \
      > restore.json 2> restore.err &
    vm=$!
    ready "$D/kr.sock" $vm || fail "run $i: kiln's restored guest never answered"
  else
    t0=$(now_us)
    "$FILES/firecracker" --api-sock "$D/frapi.sock" --level Warn > fcr.out 2>&1 &
    vm=$!
    until [ -S "$D/frapi.sock" ]; do alive $vm || fail "run $i: Firecracker ended"; sleep 0.01; done
    http PUT /snapshot/load "$D/frapi.sock" \
      "{{\"snapshot_path\": \"$D/fsnap\", \"mem_backend\": {{\"backend_type\": \"File\", \"backend_path\": \"$D/fmem\"}}, \"resume_vm\": true}}" \
      >> fcr.out 2>&1 || fail "run $i: Firecracker snapshot load failed"
    ready "$D/fv.sock" $vm || fail "run $i: Firecracker's restored guest never answered"
  fi
  t1=$(now_us)
  echo "BENCH-PEER-RESTORE $((i % 2)) $((t1 - t0))"
  if [ $((i % 2)) = 0 ]; then
    # SIGTERM, so that kiln prints its report with its set-up phases.
    kill -TERM $vm; wait $vm
    echo "BENCH-KILN-REPORT $(grep '^{{' restore.json | tail -n 1)"
  fi
  stop $vm
  i=$((i + 1))
done
"#,
        total = runs * 2,
    );
    let mut files = agent_files()?;
    files.push(firecracker_file(firecracker)?);
    let exe = std::env::current_exe().context("finding the kiln-benches binary")?;
    files.extend(kiln_tests::host_tools::program_files(
        &exe,
        "/bin/peer-http",
        "peer-tools",
    )?);
    let timeout = Duration::from_secs(300 + (READY_DEADLINE_S + 10) * 2 * runs as u64);
    let (out, _clock) = run_script(runner, "peer_restore", &script, &files, timeout)?;
    let (mut kiln, mut fc) = (Vec::new(), Vec::new());
    let mut phases = Vec::new();
    for line in out.console.lines() {
        if let Some(report) = line.trim().strip_prefix("BENCH-KILN-REPORT ") {
            let report = last_json_line(report)?;
            phases.push(report["phases_ms"].clone());
            continue;
        }
        let Some(rest) = line.trim().strip_prefix("BENCH-PEER-RESTORE ") else {
            continue;
        };
        let parsed = rest
            .split_once(' ')
            .and_then(|(side, us)| Some((side.parse::<u8>().ok()?, us.parse::<f64>().ok()?)));
        match parsed {
            Some((0, us)) => kiln.push(us / 1e3),
            Some((1, us)) => fc.push(us / 1e3),
            _ => bail!("malformed line {line:?}"),
        }
    }
    if kiln.len() != runs || fc.len() != runs {
        bail!(
            "expected {runs} restores of each VMM, got {} and {}:\n{}",
            kiln.len(),
            fc.len(),
            out.console
        );
    }
    Ok(Samples {
        kiln,
        firecracker: fc,
        kiln_phases_ms: median_phases(&phases),
    })
}

/// Each named phase's median over the runs' `phases_ms` lists (`[[name, ms], …]`), in the
/// order of the first run.
fn median_phases(runs: &[Value]) -> Value {
    let mut names: Vec<String> = Vec::new();
    let mut times: std::collections::HashMap<String, Vec<f64>> = Default::default();
    for run in runs {
        for phase in run.as_array().into_iter().flatten() {
            let (Some(name), Some(ms)) = (phase[0].as_str(), phase[1].as_f64()) else {
                continue;
            };
            if !times.contains_key(name) {
                names.push(name.to_string());
            }
            times.entry(name.to_string()).or_default().push(ms);
        }
    }
    Value::Array(
        names
            .into_iter()
            .map(|name| {
                let median = stats::summary(&times[&name]).0;
                serde_json::json!([name, (median * 1000.0).round() / 1000.0])
            })
            .collect(),
    )
}
