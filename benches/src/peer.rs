//! `peer_boot`: kiln against Firecracker on the same guest kernel and initramfs, in one
//! run where the tests run (the nested test bed here), alternating run by run so that both
//! see the same machine.
//!
//! Each run times one VMM process from its start to its exit, read in the test-bed host
//! from `/proc/timer_list` (ns): the guest boots kiln's guest vmlinux with a busybox
//! initramfs whose `/init` prints a line and reboots (`reboot -f`; both VMMs end on the
//! i8042 reset). Same command line for both, 1 vCPU, 128 MiB, no devices but the serial
//! console (kiln `--no-rng`). A run counts only if the VMM exited 0 and the init's line is
//! in its console output.
//!
//! The Firecracker binary: `$KILN_PEER_FIRECRACKER`, else `../shared/peers/firecracker`
//! beside the checkout; without one the bench is reported as skipped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::Runner;
use serde_json::{json, Map, Value};

use crate::stats;

/// The command line both VMMs give the guest: kiln's default.
pub const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1 io_delay=none quiet";
/// What the peer initramfs's `/init` prints before it reboots.
const INIT_LINE: &str = "kiln-peer: init ran";
/// The environment variable naming a Firecracker binary.
pub const FIRECRACKER_ENV: &str = "KILN_PEER_FIRECRACKER";

/// The Firecracker binary to measure against, if there is one.
pub fn firecracker() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(FIRECRACKER_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let beside = kiln_tests::kernels::repo_root().join("../shared/peers/firecracker");
    beside.is_file().then_some(beside)
}

/// A VMM of the comparison: its name, shell lines run once before the runs, and the
/// shell command that boots the guest once (its console goes to `out.txt`).
struct Side {
    name: &'static str,
    setup: &'static str,
    command: &'static str,
}

const KILN: Side = Side {
    name: "kiln",
    setup: "",
    command: r#""$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/peer-initrd.cpio" --cmdline "$CMDLINE" --vcpus 1 --memory 128 --no-rng --serial stdout"#,
};

const FIRECRACKER: Side = Side {
    name: "firecracker",
    setup: r#"cat > fc.json <<EOF
{"boot-source": {"kernel_image_path": "$GUEST_VMLINUX", "initrd_path": "$FILES/peer-initrd.cpio",
                 "boot_args": "$CMDLINE"},
 "drives": [], "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}
EOF
"#,
    command: r#""$FILES/firecracker" --no-api --config-file fc.json --level Warn"#,
};

pub fn boot(runner: &Runner, runs: usize) -> Result<Vec<Value>> {
    let Some(firecracker) = firecracker() else {
        return Ok(vec![skipped("peer_boot")]);
    };
    let samples = alternate(runner, &firecracker, &[KILN, FIRECRACKER], runs)?;
    let (kiln, fc) = (&samples[0], &samples[1]);
    let (kiln_median, fc_median) = (stats::summary(kiln).0, stats::summary(fc).0);
    let mut extra = Map::new();
    extra.insert("peer".into(), "firecracker".into());
    extra.insert(
        "peer_binary".into(),
        firecracker.display().to_string().into(),
    );
    extra.insert("peer_median_ms".into(), round(fc_median).into());
    extra.insert("peer_runs".into(), fc.len().into());
    extra.insert("ratio".into(), round(kiln_median / fc_median).into());
    extra.insert("cmdline".into(), CMDLINE.into());
    extra.insert(
        "guest".into(),
        "guest vmlinux + busybox initramfs (init prints a line, reboots), 1 vCPU, 128 MiB; \
         process start to exit, alternating"
            .into(),
    );
    Ok(vec![stats::result(
        "peer_boot",
        runner.path_name(),
        "ms",
        kiln,
        extra,
    )])
}

fn skipped(bench: &str) -> Value {
    json!({
        "bench": bench,
        "skipped": format!(
            "no Firecracker binary (${FIRECRACKER_ENV}, or ../shared/peers/firecracker beside the checkout)"
        ),
    })
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The busybox initramfs both VMMs boot.
fn initramfs() -> Result<Vec<u8>> {
    GuestInitramfs::new()
        .init(format!("#!/bin/sh\necho '{INIT_LINE}'\nreboot -f\n"))
        .build()
}

/// Boots each side `runs` times, taking turns; returns each side's wall times in ms.
fn alternate(
    runner: &Runner,
    firecracker: &Path,
    sides: &[Side],
    runs: usize,
) -> Result<Vec<Vec<f64>>> {
    let (mut setup, mut cases) = (String::new(), String::new());
    for (i, side) in sides.iter().enumerate() {
        setup.push_str(side.setup);
        cases.push_str(&format!("    {i}) {} ;;\n", side.command));
    }
    let n = sides.len();
    let script = format!(
        r#"CMDLINE='{CMDLINE}'
now_ns() {{ sed -n 's/^now at \([0-9]*\) nsecs$/\1/p' /proc/timer_list; }}
{setup}i=0
while [ $i -lt {total} ]; do
  side=$((i % {n}))
  t0=$(now_ns)
  case $side in
{cases}  esac > out.txt 2>&1
  rc=$?
  t1=$(now_ns)
  grep -q '{INIT_LINE}' out.txt && seen=1 || seen=0
  echo "BENCH-PEER $side $t0 $t1 $rc $seen"
  if [ $rc != 0 ] || [ $seen != 1 ]; then echo "--- side $side output:"; tail -n 30 out.txt; fi
  i=$((i+1))
done
"#,
        total = runs * n,
    );
    let firecracker_bin =
        std::fs::read(firecracker).with_context(|| format!("reading {}", firecracker.display()))?;
    let files = [
        ("peer-initrd.cpio".to_string(), initramfs()?),
        ("firecracker".to_string(), firecracker_bin),
    ];
    let timeout = Duration::from_secs(60 + 40 * (runs * n) as u64);
    let out = runner.run(&script, &files, timeout)?;
    let mut samples = vec![Vec::new(); n];
    for line in out.console.lines() {
        let Some(rest) = line.trim().strip_prefix("BENCH-PEER ") else {
            continue;
        };
        let fields: Vec<u64> = rest
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("malformed line {line:?}"))?;
        let [side, t0, t1, rc, seen] = fields[..] else {
            bail!("malformed line {line:?}");
        };
        let side = usize::try_from(side)?;
        let name = sides.get(side).map_or("?", |s| s.name);
        if rc != 0 || seen != 1 {
            bail!(
                "a {name} boot failed (exit {rc}, init line seen: {}):\n{}",
                seen == 1,
                out.console
            );
        }
        samples[side].push((t1.saturating_sub(t0)) as f64 / 1e6);
    }
    if samples.iter().any(|s| s.len() != runs) {
        bail!(
            "expected {runs} boots of each VMM, got {:?}:\n{}",
            samples.iter().map(Vec::len).collect::<Vec<_>>(),
            out.console
        );
    }
    Ok(samples)
}
