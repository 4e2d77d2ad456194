//! The guest agent on the guest kernel under plain QEMU (TCG): checks the agent and the
//! guest image without kiln. QEMU's `isa-debugcon` on the signal port records the marks.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln_agent::marks::{BOOT_DONE, SIGNAL_PORT};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::output::value;
use kiln_tests::process::{exit_code, run_captured, Captured};
use kiln_tests::qemu::{tcg_tsc_params, Qemu};
use kiln_tests::tmp::TempDir;

const RC: &str = r#"
echo "KILN-HOSTNAME=$(hostname)"
echo "KILN-MOUNTS=$(awk '{printf "%s ", $2}' /proc/mounts)"
echo "KILN-PATH=$PATH"
# An orphan: its parent exits at once, so PID 1 inherits it and must reap it.
sh -c 'sleep 0.2 & echo $! > /tmp/orphan'
p=$(cat /tmp/orphan)
i=0
while [ -e /proc/$p ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
if [ -e /proc/$p ]; then echo KILN-ORPHAN=left; else echo KILN-ORPHAN=reaped; fi
exit 3
"#;

fn cmdline() -> String {
    format!("console=ttyS0 reboot=k panic=-1 {}", tcg_tsc_params())
}

#[test]
fn boot_agent_runs_rc_under_qemu() -> Result<()> {
    // Without device nodes the kernel starts init with fds 0-2 closed; the agent must
    // open the console itself.
    for device_nodes in [true, false] {
        let dir = TempDir::new("agent")?;
        let image = GuestInitramfs::new().rc(RC).device_nodes(device_nodes);
        let (run, marks) = boot_under_qemu(&dir, image)?;
        let console = &run.output;
        let what = format!("device nodes: {device_nodes}; console:\n{console}");
        let status = run
            .status
            .with_context(|| format!("the guest did not reset in time; {what}"))?;
        ensure!(exit_code(status) == 0, "QEMU failed ({status}); {what}");
        eprintln!(
            "device nodes {device_nodes}: boot to reset took {:?}",
            run.elapsed
        );

        ensure!(marks == [BOOT_DONE], "marks {marks:?}; {what}");
        ensure!(value(console, "KILN-HOSTNAME") == Some("kiln"), "{what}");
        let mounts = value(console, "KILN-MOUNTS").unwrap_or_default();
        for m in ["/proc", "/sys", "/dev", "/tmp", "/run"] {
            ensure!(mounts.split(' ').any(|x| x == m), "{m} not mounted; {what}");
        }
        ensure!(
            value(console, "KILN-PATH").is_some_and(|p| p.contains("/bin")),
            "{what}"
        );
        ensure!(value(console, "KILN-ORPHAN") == Some("reaped"), "{what}");
        ensure!(console.contains("kiln-agent: rc exited with 3"), "{what}");
        ensure!(!console.contains("Kernel panic"), "{what}");
    }
    Ok(())
}

#[test]
fn boot_agent_without_rc_just_reboots() -> Result<()> {
    let dir = TempDir::new("agent-norc")?;
    let (run, marks) = boot_under_qemu(&dir, GuestInitramfs::new())?;
    let what = format!("console:\n{}", run.output);
    ensure!(
        run.status.is_some(),
        "the guest did not reset in time; {what}"
    );
    ensure!(marks == [BOOT_DONE], "{what}");
    ensure!(
        !run.output.contains("kiln-agent:"),
        "the agent complained; {what}"
    );
    Ok(())
}

/// Boots the guest kernel with `image` as its initramfs under QEMU (1 vCPU, 256 MiB) until
/// it resets or 180 s pass; returns the run and the marks the signal port recorded.
fn boot_under_qemu(dir: &TempDir, image: GuestInitramfs) -> Result<(Captured, Vec<u8>)> {
    let kernel = kiln_tests::kernels::guest()?;
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&initrd, image.build()?)?;
    let marks = dir.path().join("marks");
    let qemu = Qemu {
        memory_mib: 256,
        cpus: 1,
        ..Qemu::new(&kernel.bzimage, &initrd, &cmdline())
    }
    .port_log(SIGNAL_PORT, &marks);
    let run = run_captured(qemu.command(), Duration::from_secs(180))?;
    let marks = std::fs::read(&marks).context("reading the signal-port log")?;
    Ok((run, marks))
}
