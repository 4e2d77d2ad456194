//! `kiln job` and `kiln exec`: CI job I/O over virtio-vsock through the guest agent.
//!
//! Each test runs one script through [`Runner::detect`] (direct on hardware
//! virtualization, else the nested test bed) and boots fresh VMs inside it with an
//! initramfs whose init is the agent, serving on vsock (no rc script).

use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::output::{sections, value};
use kiln_tests::Runner;

const TIMEOUT: Duration = Duration::from_secs(300);

/// The agent image plus the given job scripts as extra files.
fn files(scripts: &[(&str, &str)]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = vec![("agent.cpio".to_string(), GuestInitramfs::new().build()?)];
    for (name, text) in scripts {
        files.push((name.to_string(), text.as_bytes().to_vec()));
    }
    Ok(files)
}

/// `kiln job` with the agent image: `JOB script.sh` in a test-bed script.
const JOB_FN: &str = r#"
JOB() {
  "$KILN" job --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 256 "$@"
}
"#;

#[test]
fn job_exit_codes_reach_the_host() -> Result<()> {
    let runner = Runner::detect()?;
    let scripts = [
        ("ok.sh", "echo out-line; echo err-line >&2; exit 0\n"),
        ("one.sh", "echo failing; exit 1\n"),
        ("answer.sh", "x=$((6*7)); echo \"computed $x\"; exit $x\n"),
        ("killed.sh", "echo about to die; kill -KILL $$\n"),
    ];
    let mut script = JOB_FN.to_string();
    for (name, _) in &scripts {
        script.push_str(&format!(
            "echo KILN-CASE={name}\nJOB --script \"$FILES/{name}\" --env GREETING=hi\necho KILN-JOB-EXIT=$?\n"
        ));
    }
    let out = runner.run(&script, &files(&scripts)?, TIMEOUT)?;
    let cases = sections(&out.console, "KILN-CASE");
    let code = |name: &str| {
        cases
            .iter()
            .find(|c| c.0 == name)
            .and_then(|c| value(c.1, "KILN-JOB-EXIT"))
    };
    ensure!(code("ok.sh") == Some("0"), "ok.sh: {}", out.console);
    ensure!(code("one.sh") == Some("1"), "one.sh: {}", out.console);
    ensure!(
        code("answer.sh") == Some("42"),
        "answer.sh: {}",
        out.console
    );
    ensure!(
        code("killed.sh") == Some("137"),
        "killed.sh (128+SIGKILL): {}",
        out.console
    );
    ensure!(out.console.contains("out-line") && out.console.contains("err-line"));
    ensure!(out.console.contains("computed 42"));
    Ok(())
}
