//! `blk`: sequential virtio-blk throughput, write and read, with `dd` of N MiB (1 MiB
//! blocks, `O_DIRECT` so the guest's page cache is out of the way) to and from `/dev/vdb`, a
//! raw image without a filesystem (`/dev/vda` is a small second disk, so that the bench
//! disk is not the first device). One VM (`kiln run --disk a.img --disk b.img`), the
//! agent image, all samples in it: first the writes, then the reads of what they wrote.
//!
//! The figure is the host's (test-bed host's) wall time around `kiln exec -- dd …`, so it
//! includes one exec's set-up (~0.1 s in the test bed); the guest's own time for the `dd`
//! alone (its `/proc/uptime` before and after, 10 ms resolution) is reported as well
//! (`guest_dd_median_mib_s`). Images live in the test bed's tmpfs, so this
//! measures kiln's device path (virtio queue, bounce buffer, pread/pwrite), not a disk.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln_tests::shell::WAIT_AGENT;
use kiln_tests::Runner;
use serde_json::{Map, Value};

use crate::stats;
use crate::vsock::{agent_files, run_script, CLOCK_SH};

/// What to measure.
pub struct Params {
    /// Samples of each direction.
    pub runs: usize,
    /// MiB per sample.
    pub mib: u64,
}

pub fn run(runner: &Runner, p: &Params) -> Result<Vec<Value>> {
    ensure!(p.mib > 0 && p.runs > 0, "nothing to measure");
    let (runs, mib) = (p.runs, p.mib);
    let script = format!(
        r#"set -e
{CLOCK_SH}
V="$PWD/v.sock"
dd if=/dev/zero of=a.img bs=1M count=1 2>/dev/null
dd if=/dev/zero of=b.img bs=1M count={mib} 2>/dev/null
"$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --vcpus 1 --memory 256 \
  --vsock "$V" --serial null --disk "$PWD/a.img" --disk "$PWD/b.img" 2> run.err &
vm=$!
{WAIT_AGENT}
# In the guest, /proc/uptime around dd (10 ms resolution) times the transfer alone.
timed() {{ "$KILN" exec --vsock "$V" -- sh -c \
  "read a _ < /proc/uptime; $1 2>/dev/null || exit 1; read b _ < /proc/uptime; echo \$a \$b"; }}
for dir in WRITE READ; do
  i=0
  while [ $i -lt {runs} ]; do
    a=$(now_us)
    if [ $dir = WRITE ]; then
      g=$(timed "dd if=/dev/zero of=/dev/vdb bs=1M count={mib} oflag=direct")
    else
      g=$(timed "dd if=/dev/vdb of=/dev/null bs=1M count={mib} iflag=direct")
    fi
    b=$(now_us)
    echo "BENCH-$dir $((b - a)) $g"
    i=$((i + 1))
  done
done
kill -TERM $vm
rc=0; wait $vm || rc=$?
[ $rc = 143 ] || {{ echo "kiln run ended with $rc"; cat run.err; exit 1; }}
"#
    );
    let files = agent_files()?;
    let timeout = Duration::from_secs(150 + 2 * (10 + mib) * runs as u64);
    let (out, clock) = run_script(runner, "blk", &script, &files, timeout)?;
    let (mut write, mut read, mut guest_write, mut guest_read) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for line in out.console.lines() {
        let mut words = line.split_whitespace();
        let (host, guest) = match words.next() {
            Some("BENCH-WRITE") => (&mut write, &mut guest_write),
            Some("BENCH-READ") => (&mut read, &mut guest_read),
            _ => continue,
        };
        let us: f64 = words.next().context("a sample without a time")?.parse()?;
        ensure!(us > 0.0, "a transfer took no time: the clock is broken");
        host.push(mib as f64 / (us / 1e6));
        let mut uptime = || words.next().and_then(|s| s.parse::<f64>().ok());
        if let (Some(a), Some(b)) = (uptime(), uptime()) {
            if b > a {
                guest.push(mib as f64 / (b - a));
            }
        }
    }
    ensure!(
        write.len() == runs && read.len() == runs,
        "expected {runs} write and {runs} read samples:\n{}",
        out.console
    );
    let mut results = Vec::new();
    for (bench_dir, samples, guest) in [
        ("write", &write, &guest_write),
        ("read", &read, &guest_read),
    ] {
        let mut extra = Map::new();
        extra.insert("direction".into(), bench_dir.into());
        extra.insert("bytes".into(), (mib << 20).into());
        extra.insert(
            "what".into(),
            format!(
                "kiln exec -- dd {} /dev/vdb bs=1M count={mib} O_DIRECT, raw disk in tmpfs, \
                 host time around the exec",
                if bench_dir == "write" { "to" } else { "from" }
            )
            .into(),
        );
        if !guest.is_empty() {
            let (median, _, _) = stats::summary(guest);
            extra.insert(
                "guest_dd_median_mib_s".into(),
                ((median * 1000.0).round() / 1000.0).into(),
            );
        }
        extra.insert(
            "guest".into(),
            "guest vmlinux + agent initramfs, 1 vCPU, 256 MiB".into(),
        );
        extra.insert("clock".into(), clock.clone().into());
        results.push(stats::result(
            "blk",
            runner.path_name(),
            "mib_s",
            samples,
            extra,
        ));
    }
    Ok(results)
}
