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
    let testbed = Testbed::new()?;
    let cpus = testbed.cpus;
    let runner = Runner::Testbed(testbed);
    let script = r#"
        set -e
        echo "NPROC=$(nproc)"
        echo "CLOCKSOURCE=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
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
    let nproc = kiln_tests::output::number::<u32>(&out.console, "NPROC");
    assert_eq!(
        nproc,
        Some(cpus),
        "the test bed has fewer CPUs than asked for"
    );
    // Without a TSC clocksource KVM guests in the test bed hang now and then.
    let clocksource = kiln_tests::output::value(&out.console, "CLOCKSOURCE");
    assert!(
        clocksource.is_some_and(|c| c.starts_with("tsc")),
        "clocksource {clocksource:?}; console:\n{}",
        out.console
    );
    let present = out.console.matches("PRESENT=").count();
    assert_eq!(present, 4, "console:\n{}", out.console);
    Ok(())
}

#[test]
fn boot_testbed_reports_a_missing_end_marker() -> Result<()> {
    let runner = Runner::Testbed(Testbed::new()?);
    // The test bed ends before its init can print the exit code.
    let err = runner
        .run(
            "echo partial-output; reboot -f",
            &[],
            Duration::from_secs(300),
        )
        .expect_err("a run without an end marker must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("KILN-TESTBED-EXIT"), "{msg}");
    assert!(
        msg.contains("partial-output"),
        "the error quotes the console: {msg}"
    );
    Ok(())
}

#[test]
fn boot_testbed_timeout_is_an_error_with_the_console() -> Result<()> {
    let runner = Runner::Testbed(Testbed::new()?);
    let start = Instant::now();
    let err = runner
        .run("echo before-hang; sleep 1000", &[], Duration::from_secs(30))
        .expect_err("a hung script must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("did not finish within"), "{msg}");
    assert!(
        msg.contains("before-hang"),
        "the error quotes the console: {msg}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(120),
        "{:?}",
        start.elapsed()
    );
    Ok(())
}

/// The direct runner's mechanics (env, files, exit code) without booting anything, so it
/// runs on any machine.
#[test]
fn boot_direct_runner_runs_script() -> Result<()> {
    let script = r#"
        echo "DATA=$(cat "$FILES/data")"
        for f in "$KILN" "$GUEST_VMLINUX" "$GUEST_BZIMAGE" "$GUEST_INITRD"; do
            test -s "$f" && echo "PRESENT=$f"
        done
        echo to-stderr >&2
        exit 5
    "#;
    let files = [("data".to_string(), b"direct".to_vec())];
    let out = Runner::Direct.run(script, &files, Duration::from_secs(120))?;
    assert_eq!(out.exit_code, 5, "output:\n{}", out.console);
    assert_eq!(
        kiln_tests::output::value(&out.console, "DATA"),
        Some("direct")
    );
    assert_eq!(
        out.console.matches("PRESENT=").count(),
        4,
        "{}",
        out.console
    );
    assert!(out.console.contains("to-stderr"), "{}", out.console);
    Ok(())
}

/// A stand-in for QEMU that plays a test bed whose host kernel panics on its first
/// `panics` boots and runs the script on the next (it prints the markers, not the
/// script's own output), counting boots in `$dir/boots`.
fn panicking_qemu(dir: &std::path::Path, panics: u32) -> Result<std::ffi::OsString> {
    let fake = dir.join("fake-qemu");
    let boots = dir.join("boots");
    std::fs::write(
        &fake,
        format!(
            r#"#!/bin/sh
echo x >> '{boots}'
echo KILN-TESTBED-BEGIN
if [ "$(wc -l < '{boots}')" -le {panics} ]; then
    echo '[    8.724204] RIP: 0010:0xffffffff813a397c'
    echo '[    8.724362] Kernel panic - not syncing: Fatal exception in interrupt'
    exit 0
fi
echo after-the-panic
printf '\nKILN-TESTBED-EXIT=5\n'
"#,
            boots = boots.display()
        ),
    )?;
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(fake.into_os_string())
}

fn boots(dir: &std::path::Path) -> usize {
    std::fs::read_to_string(dir.join("boots")).map_or(0, |s| s.lines().count())
}

#[test]
fn testbed_host_panic_boots_the_test_bed_once_more() -> Result<()> {
    let dir = kiln_tests::tmp::TempDir::new("fake-qemu")?;
    let log = dir.path().join("incidents");
    let testbed = Testbed {
        qemu: panicking_qemu(dir.path(), 1)?,
        incident_log: Some(log.clone()),
        ..Testbed::new()?
    };
    let out = Runner::Testbed(testbed).run("exit 5", &[], Duration::from_secs(60))?;
    let incidents = std::fs::read_to_string(&log)?;
    assert_eq!(incidents.lines().count(), 1, "{incidents}");
    assert!(
        incidents.contains("Fatal exception in interrupt (RIP: 0010:0xffffffff813a397c)"),
        "{incidents}"
    );
    assert_eq!(
        boots(dir.path()),
        2,
        "the panicked test bed was not booted again"
    );
    assert_eq!(out.exit_code, 5);
    assert_eq!(out.console.trim(), "after-the-panic");
    Ok(())
}

#[test]
fn testbed_host_panicking_twice_fails_with_the_panic() -> Result<()> {
    let dir = kiln_tests::tmp::TempDir::new("fake-qemu")?;
    let testbed = Testbed {
        qemu: panicking_qemu(dir.path(), 2)?,
        incident_log: Some(dir.path().join("incidents")),
        ..Testbed::new()?
    };
    let err = Runner::Testbed(testbed)
        .run("exit 5", &[], Duration::from_secs(60))
        .unwrap_err();
    assert_eq!(boots(dir.path()), 2, "booted {} times", boots(dir.path()));
    let err = format!("{err:#}");
    assert!(
        err.contains("Kernel panic - not syncing: Fatal exception"),
        "{err}"
    );
    Ok(())
}
