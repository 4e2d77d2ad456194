//! `fork` and `fork_memory`: N clones of one snapshot with `kiln fork`, timed in
//! one test-bed boot (or directly on a host with hardware virtualization). The snapshot is
//! of the agent image (no rc script), 1 vCPU, 256 MiB, booted with `kiln run --vsock --api`
//! and snapshotted once; every run forks N clones of it.
//!
//! - `fork`: from the start of `kiln fork --count N` to the moment every clone has
//!   answered a `kiln exec -- true`, in ms (`first_ready_ms`: the first clone's answer,
//!   median). Clone 0 is polled alone (retried every 50 ms), the others all at once after
//!   it answers: the clones restore side by side and answer at about the same time, and
//!   execs in flight to all of them while they restore would slow them down. Polled one
//!   after the other instead, the last clone answered ~0.35 s × N later than the first
//!   in the test bed, an artefact of the polling.
//! - `fork_memory`: the clones' `kiln` processes' summed Pss (from
//!   `/proc/PID/smaps_rollup`) divided by N, in MiB, measured once all answer; Rss per
//!   clone is in `rss_mib_per_clone` (median). Pss charges shared pages (the snapshot's
//!   memory file in the page cache) to the clones that map them in equal parts.
//!
//! In the test bed (QEMU TCG, 2 vCPUs, 2 GiB, on a shared 2-core host) the time grows
//! about linearly with the count, ~0.8 s per clone (medians of 3: 1 clone 1.6 s, 4 clones
//! 3.8 s, 8 clones 7.7 s, 16 clones 11-17 s): the clones restore side by side and the
//! test bed's two emulated CPUs are the limit. Memory is not: 16 clones leave ~1.88 GiB
//! MemAvailable, Rss ~13 MiB per clone, and Pss per clone falls as the clones share the
//! snapshot's page cache (12 MiB for 1 clone, 2.8 MiB each for 16). No clone logged a
//! refresh warning.
//!
//! Every run ends with SIGTERM to `kiln fork` (which passes it on to each clone) and waits,
//! bounded, until no `kiln` process is left; a failing run kills every `kiln` process
//! (SIGKILL after 10 s) before the script exits.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln_tests::Runner;
use serde_json::{Map, Value};

use crate::stats;
use crate::vsock::{agent_files, run_script, CLOCK_SH};

/// What to measure.
pub struct Params {
    /// Forks to time.
    pub runs: usize,
    /// Clones per fork.
    pub count: u32,
}

/// Seconds a run may take for all clones to answer before it fails: this, plus one per
/// clone.
const READY_DEADLINE_S: u64 = 120;

pub fn run(runner: &Runner, p: &Params) -> Result<Vec<Value>> {
    ensure!(p.runs > 0, "nothing to measure");
    ensure!(p.count > 0, "at least one clone");
    let (runs, n) = (p.runs, p.count);
    let deadline_s = READY_DEADLINE_S + u64::from(n);
    let script = format!(
        r#"
{CLOCK_SH}
D="$PWD"
N={n}
fork=
# alive PID: PID runs (a zombie does not).
alive() {{ [ -r /proc/$1/stat ] && ! grep -q '^[0-9]* ([^)]*) Z' /proc/$1/stat; }}
# live_kiln: the pids of the kiln processes still running.
live_kiln() {{ for p in $(pidof kiln); do alive $p && echo $p; done; true; }}
# stop_all: SIGTERM to kiln fork (it passes it on) and every kiln left, SIGKILL after 10 s;
# returns once no kiln process runs (or says so after 20 s).
stop_all() {{
  [ -z "$fork" ] || kill -TERM $fork 2>/dev/null
  for p in $(live_kiln); do kill -TERM $p 2>/dev/null; done
  i=0
  while [ -n "$(live_kiln)" ]; do
    i=$((i + 1))
    if [ $i -eq 100 ]; then
      echo "BENCH-KILL $(live_kiln | wc -w) kiln processes still running after 10 s"
      for p in $(live_kiln); do kill -KILL $p 2>/dev/null; done
    fi
    if [ $i -ge 200 ]; then echo "BENCH-STUCK $(live_kiln)"; return 1; fi
    sleep 0.1
  done
  [ -z "$fork" ] || wait $fork 2>/dev/null
  fork=
  return 0
}}
fail() {{
  echo "BENCH-FAIL $*"
  for f in run.err fork.err fork.out; do [ -f $f ] && {{ echo "--- $f"; tail -n 20 $f; }}; done
  # The consoles of clones that are gone: why they ended.
  i=0
  while [ $i -lt $N ]; do
    grep -q "\"clone\":$i,\"exit_code\"" fork.out 2>/dev/null && {{ echo "--- clone $i console"; tail -n 25 "$D/con-$i"; }}
    i=$((i + 1))
  done
  stop_all
  exit 1
}}
trap 'stop_all' EXIT
# wait_socket I: waits (bounded) until clone I's vsock socket appears, once it has started.
wait_socket() {{
  until [ -S "$D/c-$1" ]; do
    alive $fork || fail "run $r: kiln fork ended before clone $1's socket appeared"
    [ $(now_us) -lt $deadline ] || fail "run $r: no socket for clone $1 after {deadline_s} s"
    sleep 0.05
  done
}}
# ready SOCK PID DEADLINE_US: retries `kiln exec -- true` on SOCK (each try bounded) while
# PID lives, until DEADLINE_US.
ready() {{
  until timeout 5 "$KILN" exec --vsock "$1" -- true 2>/dev/null; do
    alive $2 || return 1
    [ $(now_us) -lt $3 ] || return 1
    sleep 0.05
  done
}}
"$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --vcpus 1 --memory 256 \
  --vsock "$D/v.sock" --api "$D/api.sock" --serial null 2> run.err &
vm=$!
ready "$D/v.sock" $vm $(($(now_us) + 120000000)) || fail "the original guest never answered"
"$KILN" ctl --api "$D/api.sock" snapshot --dir "$D/snap" --no-resume > /dev/null 2>> run.err \
  || fail "snapshot failed"
"$KILN" ctl --api "$D/api.sock" shutdown > /dev/null 2>> run.err || fail "shutdown failed"
wait $vm || fail "kiln run exited $?"
echo "BENCH-MEMORY-FILE-MIB $(du -m "$D/snap/memory" | cut -f1)"
r=0
while [ $r -lt {runs} ]; do
  rm -f "$D"/c-* "$D"/con-* fork.out fork.err ready*
  a=$(now_us)
  "$KILN" fork --snapshot "$D/snap" --count $N --vsock-prefix "$D/c" \
    --serial-prefix "$D/con" > fork.out 2> fork.err &
  fork=$!
  deadline=$((a + {deadline_s} * 1000000))
  # Clone 0 is polled alone (the clones restore side by side, and execs in flight to all
  # of them would slow them down); once it answers, the others are polled all at once.
  wait_socket 0
  ready "$D/c-0" $fork $deadline || fail "run $r: clone 0 never answered"
  first=$(now_us)
  pollers=
  i=1
  while [ $i -lt $N ]; do
    wait_socket $i
    ( ready "$D/c-$i" $fork $deadline && now_us > "ready$i" ) &
    pollers="$pollers $!"
    i=$((i + 1))
  done
  for p in $pollers; do wait $p; done
  b=$first; t=
  i=1
  while [ $i -lt $N ]; do
    [ -s "ready$i" ] || fail "run $r: clone $i never answered"
    read -r c < "ready$i"
    t="$t $(((c - a) / 1000))"
    [ $c -le $b ] || b=$c
    i=$((i + 1))
  done
  pss=0; rss=0; clones=0
  for p in $(live_kiln); do
    [ $p = $fork ] && continue
    m=$(awk '$1 == "Pss:" {{ p = $2 }} $1 == "Rss:" {{ r = $2 }} END {{ print p + 0, r + 0 }}' \
      /proc/$p/smaps_rollup)
    pss=$((pss + ${{m% *}})); rss=$((rss + ${{m#* }})); clones=$((clones + 1))
  done
  echo "BENCH-CLONES-READY-MS $(((first - a) / 1000))$t"
  echo "BENCH-FORK-STDERR $(grep -ci warn fork.err) warnings: $(grep -i warn fork.err | head -n 3)"
  echo "BENCH-FORK $((b - a)) $((first - a)) $clones $pss $rss $(awk '$1 == "MemAvailable:" {{ print int($2 / 1024) }}' /proc/meminfo)"
  stop_all || fail "run $r: kiln processes would not stop"
  r=$((r + 1))
done
echo "BENCH-LEFT $(live_kiln | wc -w)"
"#
    );
    let files = agent_files()?;
    let timeout = Duration::from_secs(180 + (deadline_s + 30) * runs as u64);
    let (out, clock) = run_script(runner, "fork", &script, &files, timeout)?;
    let (mut ms, mut first_ms) = (Vec::new(), Vec::new());
    let (mut pss_mib, mut rss_mib) = (Vec::new(), Vec::new());
    let (mut left, mut file_mib, mut avail) = (None, None, Vec::new());
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
            Some(&"BENCH-FORK") => {
                ensure!(
                    num(3)? == f64::from(n),
                    "{} clone processes, not {n}: {line:?}\n{}",
                    num(3)?,
                    out.console
                );
                ms.push(num(1)? / 1e3);
                first_ms.push(num(2)? / 1e3);
                // smaps_rollup is in kB.
                pss_mib.push(num(4)? / 1024.0 / f64::from(n));
                rss_mib.push(num(5)? / 1024.0 / f64::from(n));
                avail.push(num(6)?);
            }
            Some(&"BENCH-CLONES-READY-MS")
            | Some(&"BENCH-FORK-STDERR")
            | Some(&"BENCH-KILL")
            | Some(&"BENCH-STUCK") => {
                eprintln!("fork: {line}")
            }
            Some(&"BENCH-MEMORY-FILE-MIB") => file_mib = Some(num(1)?),
            Some(&"BENCH-LEFT") => left = Some(num(1)?),
            _ => {}
        }
    }
    ensure!(
        ms.len() == runs,
        "expected {runs} fork samples:\n{}",
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
        extra.insert("clones".into(), n.into());
        extra.insert("clock".into(), clock.clone().into());
        extra
    };
    let round = |v: f64| (v * 10.0).round() / 10.0;
    let mut memory =
        base("summed Pss of the clones' kiln processes (smaps_rollup) / clones, once all answer");
    memory.insert(
        "rss_mib_per_clone".into(),
        round(stats::summary(&rss_mib).0).into(),
    );
    memory.insert(
        "memory_file_mib".into(),
        file_mib.map(Value::from).unwrap_or(Value::Null),
    );
    memory.insert("mem_available_mib".into(), stats::summary(&avail).0.into());
    let mut fork =
        base("kiln fork --count N start until every clone has answered kiln exec -- true");
    fork.insert(
        "first_ready_ms".into(),
        round(stats::summary(&first_ms).0).into(),
    );
    Ok(vec![
        stats::result("fork", runner.path_name(), "ms", &ms, fork),
        stats::result("fork_memory", runner.path_name(), "mib", &pss_mib, memory),
    ])
}

/// `fork_100`: 100 clones of the agent guest's snapshot and, in the same bench run, 1
/// clone: the ratio of the times until all answer shows how far the clones' restores
/// overlap (100 would mean not at all). Its test bed has 6 GiB, room for 100 clones.
pub fn hundred(runner: &Runner) -> Result<Vec<Value>> {
    let mut runner = runner.clone();
    if let Runner::Testbed(testbed) = &mut runner {
        testbed.memory_mib = testbed.memory_mib.max(6144);
    }
    let one = run(&runner, &Params { runs: 1, count: 1 })?;
    let hundred = run(
        &runner,
        &Params {
            runs: 1,
            count: 100,
        },
    )?;
    let (one_ms, one_pss) = (field(&one[0], "median_ms")?, field(&one[1], "median_mib")?);
    let (all_ms, all_pss) = (
        field(&hundred[0], "median_ms")?,
        field(&hundred[1], "median_mib")?,
    );
    let mut extra = Map::new();
    extra.insert("clones".into(), 100.into());
    extra.insert("one_clone_ms".into(), one_ms.into());
    extra.insert(
        "ratio_to_one".into(),
        ((all_ms / one_ms * 1000.0).round() / 1000.0).into(),
    );
    extra.insert("pss_mib_per_clone".into(), all_pss.into());
    extra.insert("one_clone_pss_mib".into(), one_pss.into());
    extra.insert(
        "first_ready_ms".into(),
        hundred[0]["first_ready_ms"].clone(),
    );
    extra.insert(
        "what".into(),
        "kiln fork --count 100 start until every clone answered kiln exec -- true; the same \
         for 1 clone"
            .into(),
    );
    Ok(vec![stats::result(
        "fork_100",
        runner.path_name(),
        "ms",
        &[all_ms],
        extra,
    )])
}

fn field(result: &Value, name: &str) -> Result<f64> {
    result[name]
        .as_f64()
        .with_context(|| format!("no {name} in {result}"))
}
