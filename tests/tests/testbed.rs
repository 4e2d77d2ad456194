//! The nested test bed itself, without kiln booting anything.

use std::time::{Duration, Instant};

use anyhow::Result;
use kiln_tests::{Runner, Testbed};

#[test]
fn boot_testbed_runs_script() -> Result<()> {
    let runner = Runner::Testbed(Testbed::new()?);
    let start = Instant::now();
    let out = runner.run(
        "echo hello; ls /dev/kvm; exit 7",
        &[],
        Duration::from_secs(300),
    )?;
    eprintln!("{}: run took {:?}", runner.describe(), start.elapsed());
    let lines: Vec<&str> = out.console.lines().map(str::trim).collect();
    assert!(lines.contains(&"hello"), "console:\n{}", out.console);
    assert!(
        lines.contains(&"/dev/kvm"),
        "no /dev/kvm in the test bed; console:\n{}",
        out.console
    );
    assert_eq!(out.exit_code, 7, "console:\n{}", out.console);
    Ok(())
}

#[test]
fn boot_testbed_passes_files_and_env() -> Result<()> {
    let runner = Runner::Testbed(Testbed::new()?);
    let script = r#"
        set -e
        echo "DATA=$(cat "$FILES/sub/data.txt")"
        for f in "$KILN" "$GUEST_VMLINUX" "$GUEST_BZIMAGE" "$GUEST_INITRD"; do
            test -s "$f" && echo "PRESENT=$f"
        done
        echo scratch > ./scratch && echo "SCRATCH=$(cat ./scratch)"
    "#;
    let files = [("sub/data.txt".to_string(), b"payload".to_vec())];
    let out = runner.run(script, &files, Duration::from_secs(300))?;
    assert_eq!(out.exit_code, 0, "console:\n{}", out.console);
    assert_eq!(
        kiln_tests::output::value(&out.console, "DATA"),
        Some("payload")
    );
    assert_eq!(
        kiln_tests::output::value(&out.console, "SCRATCH"),
        Some("scratch")
    );
    let present = out.console.matches("PRESENT=").count();
    assert_eq!(present, 4, "console:\n{}", out.console);
    Ok(())
}
