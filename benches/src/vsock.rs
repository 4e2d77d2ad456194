//! `vsock_throughput` and `vsock_exec`: the job channel (virtio-vsock and the guest agent),
//! timed against one VM that `kiln run --vsock` keeps running with the agent image (no rc
//! script: the agent serves until the VM is stopped).
//!
//! - `vsock_throughput`: host ← guest MiB/s of `kiln exec -- head -c N /dev/zero` piped
//!   into `wc -c` on the host side; each sample includes one exec's set-up, which is small
//!   next to the seconds the transfer takes.
//! - `vsock_exec`: the round trip of `kiln exec -- true`, start of the `kiln` process to
//!   its exit, in ms.
//!
//! Runs where the tests run: directly on a host with hardware virtualization, else in the
//! nested test bed (one test-bed boot, one guest, all samples inside it). The clock is
//! CLOCK_MONOTONIC from `/proc/timer_list` when readable (ns), else `/proc/uptime` (10 ms).

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::shell::WAIT_AGENT;
use kiln_tests::Runner;
use serde_json::{Map, Value};

use crate::stats;

/// What to measure.
pub struct Params {
    /// Samples of `vsock_throughput` (0: skip it).
    pub throughput_runs: usize,
    /// MiB per throughput sample.
    pub mib: u64,
    /// Samples of `vsock_exec` (0: skip it).
    pub exec_runs: usize,
}

/// Sets `now_us` (a shell function printing a monotonic time in µs) and says which clock;
/// the other test-bed benchmarks use it too.
pub const CLOCK_SH: &str = r#"
if { read -r l; read -r l; read -r _ _ ns _; } < /proc/timer_list 2>/dev/null && [ -n "$ns" ]
then
  now_us() { { read -r l; read -r l; read -r _ _ ns _; } < /proc/timer_list; echo $((ns / 1000)); }
  echo "BENCH-CLOCK timer_list"
else
  # uptime has two decimals; "1$frac" keeps a leading zero from reading as octal.
  now_us() { read -r up _ < /proc/uptime; frac=${up#*.}; echo $((${up%.*} * 1000000 + 1$frac * 10000 - 1000000)); }
  echo "BENCH-CLOCK uptime"
fi
"#;

pub fn run(runner: &Runner, p: &Params) -> Result<Vec<Value>> {
    ensure!(p.mib > 0, "the transfer size must be at least 1 MiB");
    ensure!(p.throughput_runs + p.exec_runs > 0, "nothing to measure");
    let bytes = p.mib << 20;
    let (tp_runs, exec_runs) = (p.throughput_runs, p.exec_runs);
    let script = format!(
        r#"set -e
{CLOCK_SH}
V="$PWD/v.sock"
"$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --vcpus 1 --memory 256 \
  --vsock "$V" --serial null 2> run.err &
vm=$!
{WAIT_AGENT}
i=0
while [ $i -lt {exec_runs} ]; do
  a=$(now_us)
  "$KILN" exec --vsock "$V" -- true
  b=$(now_us)
  echo "BENCH-EXEC $((b - a))"
  i=$((i + 1))
done
i=0
while [ $i -lt {tp_runs} ]; do
  a=$(now_us)
  n=$("$KILN" exec --vsock "$V" -- head -c {bytes} /dev/zero | wc -c)
  b=$(now_us)
  echo "BENCH-TP $n $((b - a))"
  i=$((i + 1))
done
kill -TERM $vm
rc=0; wait $vm || rc=$?
[ $rc = 143 ] || {{ echo "kiln run ended with $rc"; cat run.err; exit 1; }}
"#
    );
    let files = agent_files()?;
    let timeout = Duration::from_secs(120 + 5 * exec_runs as u64 + (5 + p.mib) * tp_runs as u64);
    let (out, clock) = run_script(runner, "vsock", &script, &files, timeout)?;
    let mut exec_ms = Vec::new();
    let mut mib_s = Vec::new();
    for line in out.console.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("BENCH-EXEC") => {
                let us: f64 = words.next().context("BENCH-EXEC without a time")?.parse()?;
                exec_ms.push(us / 1e3);
            }
            Some("BENCH-TP") => {
                let got: u64 = words.next().context("BENCH-TP without a size")?.parse()?;
                let us: f64 = words.next().context("BENCH-TP without a time")?.parse()?;
                ensure!(got == bytes, "a transfer moved {got} bytes, not {bytes}");
                ensure!(us > 0.0, "a transfer took no time: the clock is broken");
                mib_s.push(p.mib as f64 / (us / 1e6));
            }
            _ => {}
        }
    }
    ensure!(
        exec_ms.len() == exec_runs && mib_s.len() == tp_runs,
        "expected {exec_runs} exec and {tp_runs} transfer samples:\n{}",
        out.console
    );
    let guest = "guest vmlinux + agent initramfs (no rc), 1 vCPU, 256 MiB";
    let mut results = Vec::new();
    if tp_runs > 0 {
        let mut extra = Map::new();
        extra.insert("bytes".into(), bytes.into());
        extra.insert(
            "what".into(),
            "kiln exec -- head -c bytes /dev/zero | wc -c (one exec's set-up included)".into(),
        );
        extra.insert("guest".into(), guest.into());
        extra.insert("clock".into(), clock.clone().into());
        results.push(stats::result(
            "vsock_throughput",
            runner.path_name(),
            "mib_s",
            &mib_s,
            extra,
        ));
    }
    if exec_runs > 0 {
        let mut extra = Map::new();
        extra.insert(
            "what".into(),
            "kiln exec -- true, process start to exit".into(),
        );
        extra.insert("guest".into(), guest.into());
        extra.insert("clock".into(), clock.into());
        results.push(stats::result(
            "vsock_exec",
            runner.path_name(),
            "ms",
            &exec_ms,
            extra,
        ));
    }
    Ok(results)
}

/// The files of a bench script that boots a guest with the agent: `$FILES/agent.cpio`, the
/// agent image (without an rc script, the agent serves until the VM is stopped).
pub fn agent_files() -> Result<Vec<(String, Vec<u8>)>> {
    let agent = GuestInitramfs::new()
        .build()
        .context("building the agent image")?;
    Ok(vec![("agent.cpio".to_string(), agent)])
}

/// Runs a benchmark's test-bed script; a non-zero exit is an error quoting the console.
/// Returns the output and the clock the script named on its `BENCH-CLOCK` line.
pub fn run_script(
    runner: &Runner,
    what: &str,
    script: &str,
    files: &[(String, Vec<u8>)],
    timeout: Duration,
) -> Result<(kiln_tests::RunOutput, String)> {
    let out = runner.run(script, files, timeout)?;
    if out.exit_code != 0 {
        bail!(
            "{what} benchmark script failed ({}):\n{}",
            out.exit_code,
            out.console
        );
    }
    let clock = out
        .console
        .lines()
        .find_map(|l| l.trim().strip_prefix("BENCH-CLOCK "))
        .unwrap_or("?")
        .to_string();
    Ok((out, clock))
}
