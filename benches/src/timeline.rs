//! `boot_timeline`: where boot time goes. One boot of the guest kernel with
//! `initcall_debug`, where the tests run: the VMM's own set-up phases from `kiln run --json`
//! (`phases_ms`), then the guest's printk timeline read with `dmesg` through the agent once
//! it is up: when the kernel handed over to init, and which initcalls took longest (their
//! addresses named from the guest vmlinux's symbols, as the guest has no kallsyms).
//!
//! The console stays `quiet`, so the extra log lines cost little; still, this boot's
//! `boot_ms` is not the `boot` benchmark's figure.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_tests::Runner;
use serde_json::{json, Map, Value};

use crate::stats;
use crate::vmm_setup::last_json_line;

/// The default command line plus the initcall log.
const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1 io_delay=none quiet initcall_debug";
/// How many initcalls the summary names.
const TOP: usize = 15;

pub fn run(runner: &Runner) -> Result<Vec<Value>> {
    let vmlinux = kiln_tests::kernels::guest()?.vmlinux;
    let (report, timeline) = boot(runner, &vmlinux, None)?;
    let boot_ms = report["boot_ms"].as_f64().context("no boot_ms")?;

    eprintln!("boot timeline ({}; initcall_debug on):", runner.describe());
    eprintln!("  VMM set-up, from the kiln process's start:");
    for phase in report["phases_ms"].as_array().into_iter().flatten() {
        eprintln!(
            "    {:<22} {:>9.3} ms",
            phase[0].as_str().unwrap_or("?"),
            phase[1].as_f64().unwrap_or(f64::NAN)
        );
    }
    eprintln!("  guest, printk time from the kernel's start:");
    eprintln!(
        "    initcalls done, init runs  {:>9.3} ms",
        timeline.init_ms.unwrap_or(f64::NAN)
    );
    eprintln!(
        "    all initcalls              {:>9.3} ms in {} calls",
        timeline.initcalls_total_ms(),
        timeline.initcalls.len()
    );
    eprintln!("  boot done (agent ready), from kiln's start: {boot_ms:.3} ms");
    eprintln!("  slowest initcalls:");
    for (name, ms) in timeline.top(TOP) {
        eprintln!("    {ms:>9.3} ms  {name}");
    }

    let mut extra = Map::new();
    extra.insert("cmdline".into(), CMDLINE.into());
    extra.insert("phases_ms".into(), report["phases_ms"].clone());
    extra.insert("kernel_to_init_ms".into(), json!(timeline.init_ms));
    extra.insert(
        "initcalls_total_ms".into(),
        json!(timeline.initcalls_total_ms()),
    );
    extra.insert("initcalls".into(), json!(timeline.initcalls.len()));
    extra.insert("top_initcalls_ms".into(), json!(timeline.top(TOP)));
    Ok(vec![stats::result(
        "boot_timeline",
        runner.path_name(),
        "ms",
        &[boot_ms],
        extra,
    )])
}

/// One boot with `initcall_debug` of `vmlinux`: the guest kernel the test bed carries, or
/// (with `as_file`) the named file passed to it. Returns `kiln run`'s JSON report and the
/// guest's timeline, its initcalls named from `vmlinux`'s symbols.
pub fn boot(
    runner: &Runner,
    vmlinux: &std::path::Path,
    as_file: Option<&str>,
) -> Result<(Value, GuestTimeline)> {
    let kernel = match as_file {
        Some(name) => format!("\"$FILES/{name}\""),
        None => "\"$GUEST_VMLINUX\"".to_string(),
    };
    let script = kiln_tests::shell::PRELUDE.to_string()
        + &format!(
            r#"
D="$PWD"
"$KILN" run --kernel {kernel} --initrd "$FILES/agent.cpio" --vcpus 1 --memory 128 \
  --cmdline "{CMDLINE}" --vsock "$D/v.sock" --api "$D/api.sock" --serial "$D/console" --json > run.json &
vm=$!
[ "$(wait_exec "$D/v.sock" $vm)" = yes ] || {{ echo "the agent did not answer"; exit 1; }}
"$KILN" exec --vsock "$D/v.sock" -- dmesg | sed 's/^/GUEST-DMESG /'
"$KILN" ctl --api "$D/api.sock" shutdown > /dev/null
wait $vm
grep '^{{' run.json | sed 's/^/BENCH-TIMELINE /'
tail -n 30 "$D/console" | sed 's/^/GUEST-CONSOLE /'
"#
        );
    // The agent image that stays up (the default one reboots once booted).
    let mut files = vec![(
        "agent.cpio".to_string(),
        kiln_tests::guest_initramfs::GuestInitramfs::new().build()?,
    )];
    if let Some(name) = as_file {
        let bytes =
            std::fs::read(vmlinux).with_context(|| format!("reading {}", vmlinux.display()))?;
        files.push((name.to_string(), bytes));
    }
    let out = runner.run(&script, &files, Duration::from_secs(240))?;
    if out.exit_code != 0 {
        bail!("timeline boot failed ({}):\n{}", out.exit_code, out.console);
    }
    let report = out
        .console
        .lines()
        .find_map(|l| l.trim().strip_prefix("BENCH-TIMELINE "))
        .context("no JSON report from the timeline boot")
        .and_then(last_json_line)?;
    let dmesg: Vec<&str> = out
        .console
        .lines()
        .filter_map(|l| l.strip_prefix("GUEST-DMESG "))
        .collect();
    let symbols = symbols(vmlinux).unwrap_or_else(|e| {
        eprintln!("boot_timeline: initcalls stay unnamed: {e:#}");
        HashMap::new()
    });
    let timeline = GuestTimeline::parse(&dmesg, &symbols);
    if timeline.initcalls.is_empty() {
        bail!(
            "no initcall lines in the guest's dmesg ({} lines):\n{}",
            dmesg.len(),
            out.console
        );
    }
    Ok((report, timeline))
}

/// The function symbols of `vmlinux` by address (`nm`).
fn symbols(vmlinux: &std::path::Path) -> Result<HashMap<String, String>> {
    let out = Command::new("nm")
        .arg(vmlinux)
        .output()
        .context("running nm (binutils)")?;
    if !out.status.success() {
        bail!("nm {} failed", vmlinux.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let (addr, kind, name) = (parts.next()?, parts.next()?, parts.next()?);
            matches!(kind, "t" | "T").then(|| (format!("0x{addr}"), name.to_string()))
        })
        .collect())
}

/// What the guest's console says about its boot.
#[derive(Debug, Default, PartialEq)]
pub struct GuestTimeline {
    /// Each initcall and how long it took (ms), in the order they returned.
    pub initcalls: Vec<(String, f64)>,
    /// printk time when the kernel ran init (`Run /init as init process`).
    pub init_ms: Option<f64>,
}

impl GuestTimeline {
    /// Reads `dmesg` lines; an initcall printed as a bare address is named from `symbols`.
    pub fn parse(lines: &[&str], symbols: &HashMap<String, String>) -> Self {
        let mut t = GuestTimeline::default();
        for line in lines {
            let (stamp, text) = split_stamp(line);
            // "initcall foo_init+0x0/0x30 returned 0 after 123 usecs", or without kallsyms
            // "initcall 0xffffffff81900327 returned 0 after 123 usecs".
            if let Some(rest) = text.strip_prefix("initcall ") {
                let token = rest.split_whitespace().next().unwrap_or(rest);
                let token = token.split('+').next().unwrap_or(token);
                let name = symbols
                    .get(token)
                    .cloned()
                    .unwrap_or_else(|| token.to_string());
                let usecs = rest
                    .split(" after ")
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .and_then(|n| n.parse::<f64>().ok());
                if let Some(us) = usecs {
                    t.initcalls.push((name, us / 1000.0));
                }
            } else if text.starts_with("Run /init as init process") {
                t.init_ms = stamp;
            }
        }
        t
    }

    pub fn initcalls_total_ms(&self) -> f64 {
        self.initcalls.iter().map(|(_, ms)| ms).sum()
    }

    /// The `n` slowest initcalls (an initcall named twice counts once, summed).
    pub fn top(&self, n: usize) -> Vec<(String, f64)> {
        let mut by_name: HashMap<&str, f64> = HashMap::new();
        for (name, ms) in &self.initcalls {
            *by_name.entry(name).or_default() += ms;
        }
        let mut all: Vec<(String, f64)> = by_name
            .into_iter()
            .map(|(name, ms)| (name.to_string(), ms))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}

/// `[    1.234567] text` → (Some(1234.567 ms), "text"); a line without a stamp → (None, line).
fn split_stamp(line: &str) -> (Option<f64>, &str) {
    let line = line.trim_end_matches('\r');
    let Some(rest) = line.strip_prefix('[') else {
        return (None, line);
    };
    let Some((stamp, text)) = rest.split_once(']') else {
        return (None, line);
    };
    let ms = stamp.trim().parse::<f64>().ok().map(|s| s * 1000.0);
    (ms, text.trim_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initcalls_and_init_are_found() {
        let lines = [
            "[    0.010000] calling  foo_init+0x0/0x30 @ 1",
            "[    0.012000] initcall foo_init+0x0/0x30 returned 0 after 2000 usecs",
            "[    0.020000] initcall 0xffffffff81000010 returned 0 after 500 usecs",
            "[    0.021000] initcall foo_init+0x0/0x30 returned 0 after 1000 usecs",
            "[    0.300000] Run /init as init process",
            "kiln-agent: ready",
        ];
        let symbols = HashMap::from([("0xffffffff81000010".to_string(), "bar_init".to_string())]);
        let t = GuestTimeline::parse(&lines, &symbols);
        assert_eq!(t.initcalls.len(), 3);
        assert!((t.initcalls_total_ms() - 3.5).abs() < 1e-9);
        assert_eq!(t.init_ms, Some(300.0));
        assert_eq!(
            t.top(1),
            vec![("foo_init".to_string(), 3.0)],
            "repeated initcalls are summed"
        );
        assert!(t.initcalls.iter().any(|(n, _)| n == "bar_init"), "{t:?}");
        assert_eq!(
            GuestTimeline::parse(&["no stamps here"], &symbols),
            GuestTimeline::default()
        );
    }
}
