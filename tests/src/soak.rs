//! The soak: many sequential `kiln job`s, then many VMs at once, and proof that the host got
//! back everything they took. Used by `cargo xtask soak` (300 jobs) and by the `soak_` test
//! (a shorter run in the normal suite).
//!
//! Everything is measured inside the machine that runs kiln (the test-bed host, or this
//! machine on the direct path, which must then be otherwise quiet): open fds and threads of
//! user processes, processes, Unix sockets, network devices (TAP), cgroups (but kiln's
//! slots, which are kept for reuse) and the populated ones (a slot still holding a process), kiln processes, files under /tmp, and MemAvailable. The counts must come
//! back exactly; MemAvailable within [`MEM_TOLERANCE_KIB`].

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::guest_initramfs::GuestInitramfs;
use crate::output::value;
use crate::{shell, Runner};

/// MemAvailable may differ by this much: the kernel's own caches (slab, page tables of the
/// measuring processes) move a little between two reads of an idle machine.
pub const MEM_TOLERANCE_KIB: i64 = 32 * 1024;

/// Guest memory of each VM: small, so that 16 at once fit the test bed's 2 GiB (a guest
/// only takes what it touches, some 30 MiB for the agent image).
const GUEST_MIB: u32 = 96;

/// How big a soak.
#[derive(Debug, Clone, Copy)]
pub struct Soak {
    /// Sequential `kiln job`s.
    pub jobs: u32,
    /// VMs running at once in the second phase, each in its own cgroup slot.
    pub concurrent: u32,
}

/// The counts taken at one moment (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts(pub Vec<(String, i64)>);

impl Counts {
    fn parse(console: &str, label: &str) -> Result<Counts> {
        let line = value(console, &format!("KILN-SOAK-{label}"))
            .with_context(|| format!("the soak printed no {label} counts:\n{console}"))?;
        let pairs = line
            .split_whitespace()
            .map(|kv| {
                let (k, v) = kv.split_once('=').context("a count without `=`")?;
                Ok((
                    k.to_string(),
                    v.parse().with_context(|| format!("count {kv}"))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        ensure!(!pairs.is_empty(), "empty {label} counts");
        Ok(Counts(pairs))
    }

    /// The count called `name`.
    pub fn get(&self, name: &str) -> Option<i64> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }

    /// What differs from `before` beyond the tolerances, one phrase per count.
    pub fn leaks_since(&self, before: &Counts) -> Vec<String> {
        before
            .0
            .iter()
            .filter_map(|(name, b)| {
                let a = self.get(name)?;
                let ok = if name == "mem_available_kib" {
                    b - a <= MEM_TOLERANCE_KIB
                } else {
                    a == *b
                };
                (!ok).then(|| format!("{name} {b} -> {a}"))
            })
            .collect()
    }

    fn json(&self) -> String {
        let fields: Vec<String> = self.0.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", fields.join(","))
    }
}

/// What a soak measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub soak: Soak,
    /// `direct` or `testbed`.
    pub path: &'static str,
    /// Sequential jobs that exited 0 with their output.
    pub jobs_ok: u32,
    /// VMs of the concurrent phase whose agent answered while all of them ran.
    pub concurrent_ok: u32,
    /// Wall time of each phase inside the machine, and of the whole run from here.
    pub jobs_secs: f64,
    pub concurrent_secs: f64,
    pub total: Duration,
    pub before: Counts,
    /// With every concurrent VM up: what the VMs hold at once.
    pub peak: Counts,
    pub after_jobs: Counts,
    pub after: Counts,
    /// The end of the script's output (failed jobs and VMs, the first failure's log), for
    /// error messages.
    pub tail: String,
}

impl Report {
    /// Every leak: after the jobs, and at the end, against the start.
    pub fn leaks(&self) -> Vec<String> {
        let mut leaks: Vec<String> = (self.after_jobs.leaks_since(&self.before))
            .into_iter()
            .map(|l| format!("after the jobs: {l}"))
            .collect();
        leaks.extend(
            self.after
                .leaks_since(&self.before)
                .into_iter()
                .map(|l| format!("at the end: {l}")),
        );
        leaks
    }

    /// One JSON object: the soak's figures.
    pub fn json(&self) -> String {
        format!(
            "{{\"soak\":\"kiln\",\"path\":\"{}\",\"jobs\":{},\"jobs_ok\":{},\"concurrent\":{},\
             \"concurrent_ok\":{},\"jobs_s\":{:.1},\"concurrent_s\":{:.1},\"wall_s\":{:.1},\
             \"before\":{},\"peak\":{},\"after_jobs\":{},\"after\":{},\"leaks\":{}}}",
            self.path,
            self.soak.jobs,
            self.jobs_ok,
            self.soak.concurrent,
            self.concurrent_ok,
            self.jobs_secs,
            self.concurrent_secs,
            self.total.as_secs_f64(),
            self.before.json(),
            self.peak.json(),
            self.after_jobs.json(),
            self.after.json(),
            self.leaks().len()
        )
    }

    /// A table: one row per count, its value before, at the peak, after the jobs, at the end.
    pub fn table(&self) -> String {
        let mut t = format!(
            "{:<20} {:>12} {:>12} {:>12} {:>12}\n",
            "count", "before", "peak", "after jobs", "after"
        );
        for (name, b) in &self.before.0 {
            let cell = |c: &Counts| c.get(name).map_or("-".into(), |v| v.to_string());
            let _ = writeln!(
                t,
                "{name:<20} {b:>12} {:>12} {:>12} {:>12}",
                cell(&self.peak),
                cell(&self.after_jobs),
                cell(&self.after)
            );
        }
        t
    }
}

/// Runs the soak on `runner` and returns its figures; fails only if it could not run (a
/// failed job or VM, or a leak, is in the report for the caller to judge).
pub fn run(runner: &Runner, soak: Soak) -> Result<Report> {
    let files = vec![
        ("agent.cpio".to_string(), GuestInitramfs::new().build()?),
        ("job.sh".to_string(), b"echo soak-job-ok\n".to_vec()),
    ];
    // A job takes ~2-4 s in the test bed, a VM of the concurrent phase boots in a few
    // seconds more while the others boot; generous, since the machine is shared.
    let timeout = Duration::from_secs(600 + 15 * u64::from(soak.jobs + soak.concurrent));
    let start = Instant::now();
    let out = runner.run(&script(soak), &files, timeout)?;
    let total = start.elapsed();
    let c = &out.console;
    if out.exit_code != 0 {
        bail!("the soak script exited with {}:\n{c}", out.exit_code);
    }
    fn num<T: std::str::FromStr>(c: &str, key: &str) -> Result<T> {
        value(c, key)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {key} in the soak's output:\n{c}"))
    }
    Ok(Report {
        soak,
        path: runner.path_name(),
        jobs_ok: num(c, "KILN-SOAK-JOBS-OK")?,
        concurrent_ok: num(c, "KILN-SOAK-CONCURRENT-OK")?,
        jobs_secs: num(c, "KILN-SOAK-JOBS-SECS")?,
        concurrent_secs: num(c, "KILN-SOAK-CONCURRENT-SECS")?,
        total,
        before: Counts::parse(c, "BEFORE")?,
        peak: Counts::parse(c, "PEAK")?,
        after_jobs: Counts::parse(c, "AFTER-JOBS")?,
        after: Counts::parse(c, "AFTER")?,
        tail: crate::process::tail(c, crate::testbed::TAIL).to_string(),
    })
}

/// The script: counts, the sequential jobs, counts, the concurrent VMs (counts at the
/// peak), counts. Logs go to /run/soak, outside the measured /tmp.
fn script(soak: Soak) -> String {
    let mut s = shell::PRELUDE.to_string();
    let _ = write!(
        s,
        "JOBS={}\nCONC={}\nMEM={GUEST_MIB}\n",
        soak.jobs, soak.concurrent
    );
    s.push_str(SCRIPT);
    s
}

const SCRIPT: &str = r#"
L=/run/soak; mkdir -p $L
C=/sys/fs/cgroup
[ -e $C/cgroup.controllers ] || mount -t cgroup2 none $C
up() { cut -d' ' -f1 /proc/uptime; }
secs() { awk -v a="$1" -v b="$(up)" 'BEGIN { printf "%.1f\n", b - a }'; }
# Settle the kernel's caches where it lets us, so MemAvailable compares like with like.
settle() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; }
measure() { # one line of name=value
  # Globbed by the shell itself: a pipeline's other commands may or may not have started
  # when it reads /proc, so counting with `ls | grep` is off by one now and then.
  fds=$(set -- /proc/[0-9]*/fd/[0-9]*; echo $#)
  # User processes and their threads: kernel threads (kthreadd, pid 2, and its children)
  # come and go on their own. The list is taken first and each file read on its own: a
  # process that ends in between is skipped (busybox awk stops at a file it cannot open).
  pt=$(set -- /proc/[0-9]*/status; for f; do cat "$f" 2>/dev/null; done | awk '
    /^Pid:/ { p = $2 } /^PPid:/ { pp = $2 }
    /^Threads:/ { if (p != 2 && pp != 2) { n++; t += $2 } } END { print n + 0, t + 0 }')
  unix=$(($(wc -l < /proc/net/unix) - 1))
  net=$(ls /sys/class/net | wc -l)
  # Slots (kiln/slot-N) are kept for reuse by design; every other cgroup must go.
  cg=$(find $C -type d | grep -vc "^$C/kiln")
  pop=$(cat $(find $C -name cgroup.events) 2>/dev/null | grep -c '^populated 1')
  kilns=$(pidof kiln | wc -w)
  tmp=$(find /tmp | wc -l)
  mem=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo)
  echo "fds=$fds processes=${pt% *} threads=${pt#* } unix_sockets=$unix net_devices=$net cgroups=$cg populated_cgroups=$pop kiln_processes=$kilns tmp_entries=$tmp mem_available_kib=$mem"
}
counts() { # counts LABEL: the counts, as KILN-SOAK-LABEL=…
  settle
  echo "KILN-SOAK-$1=$(measure)"
}
# settled_counts LABEL: the counts, retaken (up to 20 times, 0.25 s apart) while anything
# but memory differs from BEFORE's. A process on its way out (busybox `timeout` leaves a
# watcher that notices its command is gone only on its next 1 s tick) is not a leak; a
# leak does not go away, and is reported as the last count shows it.
settled_counts() {
  settle
  tries=0
  while :; do
    now=$(measure)
    [ "${now% mem_available_kib=*}" = "${BEFORE% mem_available_kib=*}" ] && break
    tries=$((tries + 1)); [ $tries -ge 20 ] && break
    sleep 0.25
  done
  echo "KILN-SOAK-$1=$now"
}

settle
BEFORE=$(measure)
echo "KILN-SOAK-BEFORE=$BEFORE"

t=$(up); ok=0; i=1
while [ $i -le $JOBS ]; do
  "$KILN" job --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory $MEM \
    --boot-timeout 60 --script "$FILES/job.sh" > $L/job.out 2>&1
  rc=$?
  if [ $rc -eq 0 ] && grep -q soak-job-ok $L/job.out; then ok=$((ok + 1)); else
    echo "KILN-SOAK-JOB-FAILED=$i exit $rc"; [ -e $L/failed.out ] || cp $L/job.out $L/failed.out
  fi
  i=$((i + 1))
done
echo "KILN-SOAK-JOBS-OK=$ok"
echo "KILN-SOAK-JOBS-SECS=$(secs $t)"
settled_counts AFTER-JOBS

t=$(up); pids=""; i=1
while [ $i -le $CONC ]; do
  "$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory $MEM \
    --slot $i --vsock /tmp/c$i.sock --api /tmp/c$i.api --serial null > $L/c$i.out 2>&1 &
  pids="$pids $!"; i=$((i + 1))
done
ok=0; i=1
for p in $pids; do
  if [ "$(wait_exec /tmp/c$i.sock $p)" = yes ]; then ok=$((ok + 1)); else
    echo "KILN-SOAK-VM-NOT-READY=$i"; [ -e $L/failed-vm.out ] || cp $L/c$i.out $L/failed-vm.out
  fi
  i=$((i + 1))
done
echo "KILN-SOAK-CONCURRENT-OK=$ok"
counts PEAK
i=1
for p in $pids; do
  "$KILN" ctl --api /tmp/c$i.api shutdown > /dev/null 2>&1 || kill -TERM $p
  wait $p; rc=$?
  if [ $rc -ne 0 ]; then
    echo "KILN-SOAK-VM-EXIT=$i exit $rc"; [ -e $L/failed-vm.out ] || cp $L/c$i.out $L/failed-vm.out
  fi
  i=$((i + 1))
done
echo "KILN-SOAK-CONCURRENT-SECS=$(secs $t)"
settled_counts AFTER
# kiln's log of the first failed job and of the first failed VM (or of VM 1, as a sample).
[ -e $L/failed-vm.out ] || cp $L/c1.out $L/failed-vm.out
for f in $L/failed.out $L/failed-vm.out; do [ -e $f ] && { echo "--- $f"; tail -20 $f; }; done
exit 0
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_compare_exactly_and_memory_within_the_tolerance() {
        let console = "noise\nKILN-SOAK-BEFORE=fds=16 threads=3 mem_available_kib=2000000\n\
                       KILN-SOAK-AFTER=fds=17 threads=3 mem_available_kib=1990000\n";
        let before = Counts::parse(console, "BEFORE").unwrap();
        let after = Counts::parse(console, "AFTER").unwrap();
        assert_eq!(before.get("fds"), Some(16));
        // 10 MB less memory is within the tolerance; one more fd is not.
        assert_eq!(after.leaks_since(&before), ["fds 16 -> 17"]);
        let short = Counts::parse("KILN-SOAK-X=mem_available_kib=1900000", "X").unwrap();
        assert_eq!(
            short.leaks_since(&before),
            ["mem_available_kib 2000000 -> 1900000"]
        );
        assert!(Counts::parse(console, "PEAK").is_err());
        assert!(Counts::parse("KILN-SOAK-Y=fds", "Y").is_err());
        assert_eq!(
            before.json(),
            r#"{"fds":16,"threads":3,"mem_available_kib":2000000}"#
        );
    }
}
