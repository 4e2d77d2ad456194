//! `cargo xtask demo`: boot a microVM with kiln and run a sample CI job in it, on the
//! direct /dev/kvm path when the host has hardware virtualization, else in the nested
//! test bed.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_tests::{guest_initramfs, Runner};
use serde_json::Value;

/// The sample job: runs in the guest with busybox sh, then the guest reboots.
pub const RC_SCRIPT: &str = r#"echo "hello from a kiln microVM"
echo "kernel:  $(uname -r)"
echo "vcpus:   $(nproc)"
grep MemTotal /proc/meminfo
"#;

/// Run where the test bed (or the host) provides `$KILN`, `$GUEST_VMLINUX` and `$FILES`.
pub const HOST_SCRIPT: &str = r#"exec "$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/demo.cpio" --vcpus 2 --memory 256 --json"#;

/// Generous: in the nested test bed everything runs ~20-30x slower than on hardware.
const TIMEOUT: Duration = Duration::from_secs(300);

pub fn run() -> Result<()> {
    crate::setup::run()?;
    println!();
    let (console, exit_code, path) = run_in_runner()?;
    let report = Report::parse(&console);
    println!("demo: guest console:");
    for line in &report.console {
        println!("  | {line}");
    }
    match &report.summary {
        Some(summary) => {
            let boot = match summary.get("boot_ms") {
                Some(Value::Number(ms)) => format!("{ms} ms"),
                _ => "not measured (boot_ms is null)".to_string(),
            };
            let result = summary.get("result").map_or("?".into(), Value::to_string);
            println!("demo: boot_ms: {boot}");
            if path == "testbed" {
                println!("demo: (measured inside the emulated test bed: far slower than hardware)");
            }
            println!("demo: result: {result}");
        }
        None => println!("demo: kiln printed no JSON summary line"),
    }
    if exit_code != 0 {
        bail!("the demo job failed: kiln exited with status {exit_code} (console above)");
    }
    if report.summary.is_none() {
        bail!("kiln exited 0 but its last line was not the JSON summary that --json promises");
    }
    Ok(())
}

/// Runs the sample job through the test-bed library; returns (console, exit code, path).
fn run_in_runner() -> Result<(String, i32, &'static str)> {
    let runner = Runner::detect().context("choosing between direct /dev/kvm and the test bed")?;
    println!("demo: path: {}", runner.describe());
    let initrd = guest_initramfs::build(RC_SCRIPT).context("building the demo initramfs")?;
    let files = [("demo.cpio".to_string(), initrd)];
    let output = runner
        .run(HOST_SCRIPT, &files, TIMEOUT)
        .context("running the demo job")?;
    Ok((output.console, output.exit_code, runner.path_name()))
}

/// What kiln printed: the guest console, then (with --json) one JSON summary line.
#[derive(Debug, Default)]
pub struct Report {
    pub console: Vec<String>,
    pub summary: Option<serde_json::Map<String, Value>>,
}

impl Report {
    /// Splits kiln's output at its last JSON object line that has `boot_ms` or `result`.
    pub fn parse(output: &str) -> Report {
        let lines: Vec<&str> = output.lines().collect();
        for (i, line) in lines.iter().enumerate().rev() {
            let candidate = line.trim().trim_start_matches(|c| c != '{');
            if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(candidate) {
                if map.contains_key("boot_ms") || map.contains_key("result") {
                    return Report {
                        console: lines[..i].iter().map(|l| l.to_string()).collect(),
                        summary: Some(map),
                    };
                }
            }
        }
        Report {
            console: lines.iter().map(|l| l.to_string()).collect(),
            summary: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_is_the_last_json_line() {
        let out =
            "[ 0.1] booting\nhello from a kiln microVM\n{\"boot_ms\":42.5,\"result\":\"ok\"}\n";
        let report = Report::parse(out);
        assert_eq!(
            report.console,
            ["[ 0.1] booting", "hello from a kiln microVM"]
        );
        let summary = report.summary.unwrap();
        assert_eq!(summary["boot_ms"], 42.5);
        assert_eq!(summary["result"], "ok");
    }

    #[test]
    fn null_boot_ms_and_prefixed_lines_parse() {
        let report = Report::parse("x\r\nTB: {\"boot_ms\":null,\"result\":\"timeout\"}\r\ntail\n");
        let summary = report.summary.unwrap();
        assert!(summary["boot_ms"].is_null());
        assert_eq!(report.console, ["x"]);
    }

    #[test]
    fn no_summary() {
        let report = Report::parse("just console\n{not json}\n");
        assert!(report.summary.is_none());
        assert_eq!(report.console.len(), 2);
    }
}
