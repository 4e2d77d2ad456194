//! `peer_boot`: each run times one VMM process from its start to its exit, read in the test-bed host
//! from `/proc/timer_list`: the guest boots kiln's guest vmlinux with a busybox
//! initramfs whose `/init` prints a line and reboots (`reboot -f`; both VMMs end on the
//! i8042 reset). Same command line for both, 1 vCPU, 128 MiB, no devices but the serial
//! console (kiln `--no-rng`). A run counts only if the VMM exited 0 and the init's line is
//! in its console output.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::Runner;
use serde_json::Value;

use super::{firecracker, firecracker_file, peer_fields, skipped, CMDLINE};
use crate::stats;
use crate::vsock::CLOCK_SH;

/// What the peer initramfs's `/init` prints before it reboots.
const INIT_LINE: &str = "kiln-peer: init ran";

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
    let mut extra = peer_fields(&firecracker, kiln, fc);
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
{CLOCK_SH}
{setup}i=0
while [ $i -lt {total} ]; do
  side=$((i % {n}))
  t0=$(now_us)
  case $side in
{cases}  esac > out.txt 2>&1
  rc=$?
  t1=$(now_us)
  grep -q '{INIT_LINE}' out.txt && seen=1 || seen=0
  echo "BENCH-PEER $side $t0 $t1 $rc $seen"
  if [ $rc != 0 ] || [ $seen != 1 ]; then echo "--- side $side output:"; tail -n 30 out.txt; fi
  i=$((i+1))
done
"#,
        total = runs * n,
    );
    let files = [
        ("peer-initrd.cpio".to_string(), initramfs()?),
        firecracker_file(firecracker)?,
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
        samples[side].push((t1.saturating_sub(t0)) as f64 / 1e3);
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
