//! `boot`: from the kiln process's start to the guest agent's boot-done mark, booting the
//! real guest kernel with the default guest initramfs.
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
    let script = format!(
        r#"set -e
i=0
while [ $i -lt {runs} ]; do
  "$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$GUEST_INITRD" --vcpus 1 --memory 128 \
     --serial null --json | grep '^{{' | sed 's/^/BENCH-BOOT /'
  i=$((i+1))
done
"#
    );
    let timeout = Duration::from_secs(60 + 30 * runs as u64);
    let out = runner.run(&script, &[], timeout)?;
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
    let mut extra = Map::new();
    extra.insert(
        "guest".into(),
        "guest vmlinux + default initramfs, 1 vCPU, 128 MiB".into(),
    );
    extra.insert("median_setup_ms".into(), stats::summary(&setup).0.into());
    Ok(vec![stats::result(
        "boot",
        runner.path_name(),
        "ms",
        &boot,
        extra,
    )])
}
