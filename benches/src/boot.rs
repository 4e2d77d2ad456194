//! `boot`: from the kiln process's start to the guest agent's boot-done mark, booting the
//! real guest kernel with the default guest initramfs; and `boot` with `"root":"disk"`: the
//! same from an ext4 root disk (`--root-disk`, read-only, no initramfs) holding the same
//! agent, busybox and rc script.
//!
//! Runs where the tests run: directly on a host with hardware virtualization, else in the
//! nested test bed (one test-bed boot, N guest boots inside it).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_tests::Runner;
use serde_json::{Map, Value};

use crate::stats;
use crate::vmm_setup::last_json_line;

pub fn run(runner: &Runner, runs: usize) -> Result<Vec<Value>> {
    let (boot, setup) = samples(runner, runs, GUEST_KERNEL, INITRAMFS, &[])?;
    let mut extra = Map::new();
    extra.insert(
        "guest".into(),
        "guest vmlinux + default initramfs, 1 vCPU, 128 MiB".into(),
    );
    extra.insert("root".into(), "initramfs".into());
    extra.insert("median_setup_ms".into(), stats::summary(&setup).0.into());
    Ok(vec![stats::result(
        "boot",
        runner.path_name(),
        "ms",
        &boot,
        extra,
    )])
}

/// `boot` from a read-only ext4 root disk instead of the initramfs. The machine's load
/// moves boot times a lot, so each disk boot is paired with an initramfs boot right after
/// it, in the same test bed; their median is reported as `initramfs_median_ms`.
pub fn run_root_disk(runner: &Runner, runs: usize) -> Result<Vec<Value>> {
    let rc = format!("echo '{}'\n", kiln_tests::testbed::DEFAULT_RC_LINE);
    let image = kiln_tests::ext4::agent_root_image(48, &[("etc/kiln/rc", rc.as_bytes())])
        .context("building the root image")?;
    let files = [("root.img".to_string(), image)];
    let (both, setup) = samples(
        runner,
        runs * 2,
        GUEST_KERNEL,
        r#"$( [ $((i % 2)) = 0 ] && echo "--root-disk $FILES/root.img,ro" || echo "--initrd $GUEST_INITRD" )"#,
        &files,
    )?;
    let (boot, initramfs) = (pick(&both, 0), pick(&both, 1));
    let setup = pick(&setup, 0);
    let mut extra = Map::new();
    extra.insert(
        "initramfs_median_ms".into(),
        stats::summary(&initramfs).0.into(),
    );
    extra.insert(
        "guest".into(),
        "guest vmlinux, 48 MiB ext4 root disk (ro, no initramfs) with the agent as init, \
         1 vCPU, 128 MiB"
            .into(),
    );
    extra.insert("root".into(), "disk".into());
    extra.insert("median_setup_ms".into(), stats::summary(&setup).0.into());
    Ok(vec![stats::result(
        "boot",
        runner.path_name(),
        "ms",
        &boot,
        extra,
    )])
}

/// `boot_acpi`: `boot` with the ACPI tables kiln writes by default, each run paired with
/// one with `--no-acpi` right after it in the same test bed. kiln's guest kernel has no
/// ACPI and reads the MP table either way, so the ratio shows what writing the tables
/// costs a boot; the `--no-acpi` median is `no_acpi_median_ms`.
pub fn run_acpi(runner: &Runner, runs: usize) -> Result<Vec<Value>> {
    let (both, _) = samples(
        runner,
        runs * 2,
        GUEST_KERNEL,
        r#"--initrd "$GUEST_INITRD" $( [ $((i % 2)) = 0 ] || echo --no-acpi )"#,
        &[],
    )?;
    let (with, without) = (pick(&both, 0), pick(&both, 1));
    let (with_median, without_median) = (stats::summary(&with).0, stats::summary(&without).0);
    let mut extra = Map::new();
    extra.insert(
        "guest".into(),
        "guest vmlinux + default initramfs, 1 vCPU, 128 MiB, ACPI tables; each paired with a \
         --no-acpi boot"
            .into(),
    );
    extra.insert("no_acpi_median_ms".into(), without_median.into());
    extra.insert("ratio".into(), (with_median / without_median).into());
    Ok(vec![stats::result(
        "boot_acpi",
        runner.path_name(),
        "ms",
        &with,
        extra,
    )])
}

/// The `kiln run` arguments of the guest kernel this checkout builds, and of the default
/// guest initramfs (shell words; the test bed's script expands them).
pub const GUEST_KERNEL: &str = r#"--kernel "$GUEST_VMLINUX""#;
pub const INITRAMFS: &str = r#"--initrd "$GUEST_INITRD""#;

/// The samples of alternating runs whose index has `parity` (0: even, 1: odd).
pub fn pick(samples: &[f64], parity: usize) -> Vec<f64> {
    samples
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == parity)
        .map(|(_, x)| *x)
        .collect()
}

/// Boots `runs` times (run `$i` counting from 0) with `kernel` and `boot_args` (shell
/// words, which may depend on `$i`); returns (boot_ms, setup_ms).
pub fn samples(
    runner: &Runner,
    runs: usize,
    kernel: &str,
    boot_args: &str,
    files: &[(String, Vec<u8>)],
) -> Result<(Vec<f64>, Vec<f64>)> {
    let script = format!(
        r#"set -e
i=0
while [ $i -lt {runs} ]; do
  "$KILN" run {kernel} {boot_args} --vcpus 1 --memory 128 \
     --serial null --json | grep '^{{' | sed 's/^/BENCH-BOOT /'
  i=$((i+1))
done
"#
    );
    let timeout = Duration::from_secs(60 + 30 * runs as u64);
    let out = runner.run(&script, files, timeout)?;
    if out.exit_code != 0 {
        bail!(
            "boot benchmark script failed ({}):\n{}",
            out.exit_code,
            out.console
        );
    }
    let mut boot = Vec::new();
    let mut setup = Vec::new();
    for line in out.console.lines() {
        if let Some(json) = line.trim().strip_prefix("BENCH-BOOT ") {
            let report = last_json_line(json)?;
            if report["result"] != "reset" {
                bail!("a benchmark boot did not end cleanly: {report}");
            }
            boot.push(
                report["boot_ms"]
                    .as_f64()
                    .context("boot without a boot-done mark")?,
            );
            setup.push(report["setup_ms"].as_f64().unwrap_or(f64::NAN));
        }
    }
    if boot.len() != runs {
        bail!(
            "expected {runs} boots, got {}:\n{}",
            boot.len(),
            out.console
        );
    }
    Ok((boot, setup))
}
