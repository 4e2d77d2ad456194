//! `cargo xtask demo`: run a sample CI job through `kiln job` — a fresh microVM boots, the
//! guest agent runs the script, its output streams back, its exit code becomes kiln's, and
//! the VM is torn down. Runs on the direct /dev/kvm path when the host has hardware
//! virtualization, else in the nested test bed.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::output::{last_json, sections, value};
use kiln_tests::Runner;
use serde_json::Value;

/// The exit code the sample job chooses; kiln job must pass it on.
pub const JOB_EXIT_CODE: i32 = 3;

/// The sample job: a few lines of shell, run by the guest agent with busybox sh.
pub const JOB_SCRIPT: &str = r#"echo "hello from a CI job in a kiln microVM"
echo "kernel:  $(uname -sr)"
echo "vcpus:   $(nproc)"
echo "memory:  $(grep MemTotal /proc/meminfo | tr -s ' ')"
echo "job env: CI_JOB_NAME=$CI_JOB_NAME"
sum=$(seq 1 100000 | awk '{ s += $1 } END { print s }')
echo "sum of 1..100000 = $sum"
echo "this line goes to stderr" >&2
echo "exiting with 3"
exit 3
"#;

/// Run where the test bed (or the host) provides `$KILN`, `$GUEST_VMLINUX` and `$FILES`:
/// the job's stdout and stderr (with kiln's `--json` line last) are kept apart and printed
/// after kiln's exit code.
pub const HOST_SCRIPT: &str = r#""$KILN" job --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" \
  --vcpus 2 --memory 256 --env CI_JOB_NAME=demo --script "$FILES/job.sh" --json \
  > job.out 2> job.err
echo "KILN-DEMO-EXIT=$?"
echo KILN-DEMO-PART=stdout
cat job.out
echo KILN-DEMO-PART=stderr
cat job.err
echo KILN-DEMO-PART=end
"#;

/// Generous: in the nested test bed everything runs ~20-30x slower than on hardware.
const TIMEOUT: Duration = Duration::from_secs(300);

pub fn run() -> Result<()> {
    crate::setup::run()?;
    println!();
    let runner = Runner::detect().context("choosing between direct /dev/kvm and the test bed")?;
    println!("demo: path: {}", runner.describe());
    println!("demo: the job script:");
    print_lines(JOB_SCRIPT);
    let files = [
        (
            "agent.cpio".to_string(),
            GuestInitramfs::new()
                .build()
                .context("building the agent initramfs")?,
        ),
        ("job.sh".to_string(), JOB_SCRIPT.as_bytes().to_vec()),
    ];
    println!("demo: running it with `kiln job` (boot, run, tear down)...");
    let output = runner
        .run(HOST_SCRIPT, &files, TIMEOUT)
        .context("running the demo job")?;
    let report = Report::parse(&output.console)?;
    println!("demo: the job's stdout, streamed back over vsock:");
    print_lines(&report.stdout);
    println!("demo: the job's stderr:");
    print_lines(&report.stderr);
    println!("demo: kiln job exit code: {}", report.exit_code);
    match &report.summary {
        Some(summary) => {
            let ms = |key: &str| match summary.get(key).and_then(Value::as_f64) {
                Some(ms) => format!("{ms:.1} ms"),
                None => "not measured".to_string(),
            };
            println!(
                "demo: boot_ms: {} (kiln start to the agent ready), job_ms: {}",
                ms("boot_ms"),
                ms("job_ms")
            );
            if runner.path_name() == "testbed" {
                println!("demo: (measured inside the emulated test bed: far slower than hardware)");
            }
        }
        None => println!("demo: kiln printed no --json line"),
    }
    if report.exit_code != JOB_EXIT_CODE {
        bail!(
            "kiln job exited with {}, not the job's {JOB_EXIT_CODE}:\n{}",
            report.exit_code,
            output.console
        );
    }
    let json_code = report
        .summary
        .as_ref()
        .and_then(|s| s.get("exit_code"))
        .and_then(Value::as_i64);
    if json_code != Some(i64::from(JOB_EXIT_CODE)) {
        bail!("kiln job's --json line does not report exit_code {JOB_EXIT_CODE}: {json_code:?}");
    }
    Ok(())
}

fn print_lines(text: &str) {
    for line in text.lines() {
        println!("  | {line}");
    }
}

/// What the host script printed: kiln's exit code, the job's stdout and stderr, and the
/// `--json` summary (the last JSON object on stderr, taken out of it).
#[derive(Debug, Default)]
pub struct Report {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub summary: Option<serde_json::Map<String, Value>>,
}

impl Report {
    pub fn parse(console: &str) -> Result<Report> {
        let exit_code = value(console, "KILN-DEMO-EXIT")
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no exit code in the demo's output:\n{console}"))?;
        let parts = sections(console, "KILN-DEMO-PART");
        let part = |name: &str| parts.iter().find(|p| p.0 == name).map_or("", |p| p.1);
        let summary = match last_json(part("stderr")) {
            Some(Value::Object(map)) => Some(map),
            _ => None,
        };
        let stderr = part("stderr")
            .lines()
            .filter(|l| !(l.trim().starts_with('{') && l.contains("\"exit_code\"")))
            .map(|l| format!("{l}\n"))
            .collect();
        Ok(Report {
            exit_code,
            stdout: part("stdout").to_string(),
            stderr,
            summary,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONSOLE: &str = "KILN-DEMO-EXIT=3\nKILN-DEMO-PART=stdout\nhello\nsum = 5\n\
        KILN-DEMO-PART=stderr\non stderr\n{\"boot_ms\":42.5,\"exit_code\":3,\"job_ms\":7.0}\n\
        KILN-DEMO-PART=end\n";

    #[test]
    fn the_parts_are_split_and_the_json_line_taken_out() {
        let report = Report::parse(CONSOLE).unwrap();
        assert_eq!(report.exit_code, 3);
        assert_eq!(report.stdout, "hello\nsum = 5\n");
        assert_eq!(report.stderr, "on stderr\n");
        let summary = report.summary.unwrap();
        assert_eq!(summary["boot_ms"], 42.5);
        assert_eq!(summary["exit_code"], 3);
    }

    #[test]
    fn missing_exit_code_or_json() {
        assert!(Report::parse("KILN-DEMO-PART=stdout\nx\n").is_err());
        let report = Report::parse("KILN-DEMO-EXIT=1\nKILN-DEMO-PART=stderr\nboom\n").unwrap();
        assert!(report.summary.is_none());
        assert_eq!(report.stderr, "boom\n");
    }

    #[test]
    fn the_job_script_exits_with_the_chosen_code() {
        assert!(JOB_SCRIPT
            .trim_end()
            .ends_with(&format!("exit {JOB_EXIT_CODE}")));
    }
}
