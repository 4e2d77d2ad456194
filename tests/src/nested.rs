//! The nested path: the script runs inside the test bed, a QEMU TCG machine with SVM whose
//! Linux (the test-bed host kernel) gives kiln a real `/dev/kvm`.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::process::{run_captured, tail};
use crate::qemu::Qemu;
use crate::testbed::{Job, RunOutput, Testbed, TAIL};
use crate::{busybox, cpio, host_tools};

/// The test-bed host's kernel command line.
pub const TESTBED_CMDLINE: &str = "console=ttyS0 panic=-1 quiet reboot=t";
const BEGIN: &str = "KILN-TESTBED-BEGIN";
const END: &str = "KILN-TESTBED-EXIT=";

/// How many times a run is booted again after the test-bed host's own kernel panicked.
///
/// The test-bed host runs under QEMU TCG's emulation of SVM, which now and then gets a
/// nested #VMEXIT wrong: the CI run that added this saw an IPI delivered to the host right
/// after VMRUN returned, while the global interrupt flag should have held it and the
/// guest's GS base was still loaded, so the host faulted on its own per-CPU data and
/// panicked. That says nothing about kiln, which runs as a process on that host; a test
/// whose host panics twice in a row fails, panic quoted.
const HOST_PANIC_REBOOTS: u32 = 1;
/// The default of [`Testbed::incident_log`], where each such reboot is recorded (one line
/// per panic): `cargo xtask test` sets it and prints the file at the end, so a rerun is
/// never silent.
pub const INCIDENT_LOG_ENV: &str = "KILN_TESTBED_INCIDENTS";

/// Boots the test bed with the job in its initramfs and reads the result off its console.
pub(crate) fn run(testbed: &Testbed, job: &Job) -> Result<RunOutput> {
    let initrd = job.dir.join("testbed.cpio");
    write_image(job, &initrd)?;
    let qemu = Qemu {
        binary: testbed.qemu.clone(),
        memory_mib: testbed.memory_mib,
        cpus: testbed.cpus,
        ..Qemu::new(&testbed.kernel.bzimage, &initrd, &testbed.cmdline)
    };
    let mut reboots = 0;
    loop {
        let run = run_captured(qemu.command(), job.timeout)?;
        let console = run.output.replace("\r\n", "\n");
        if run.status.is_none() {
            bail!(
                "the test bed did not finish within {:?}; console tail:\n{}",
                job.timeout,
                tail(&console, TAIL)
            );
        }
        let result = between_markers(&console);
        match host_panic(&console) {
            Some(panic) if result.is_err() && reboots < HOST_PANIC_REBOOTS => {
                reboots += 1;
                record_incident(
                    testbed.incident_log.as_deref(),
                    &format!(
                        "the test-bed host kernel panicked (QEMU TCG's emulation, not kiln); \
                     booting the test bed again: {panic}"
                    ),
                );
            }
            _ => return result,
        }
    }
}

/// The test-bed host's own panic, summed up in its panic and RIP lines, if its console
/// shows one and never reached the end of the script. A guest kernel's panic, printed
/// through kiln, is followed by the script going on to its exit marker.
fn host_panic(console: &str) -> Option<String> {
    if console.contains(&format!("\n{END}")) {
        return None;
    }
    let panic = console
        .lines()
        .rfind(|l| l.contains("Kernel panic - not syncing"))?;
    let rip = console.lines().rfind(|l| l.contains("RIP: "));
    let strip = |l: &str| {
        l.split_once("] ")
            .map_or(l, |(_, rest)| rest)
            .trim()
            .to_string()
    };
    Some(match rip {
        Some(rip) => format!("{} ({})", strip(panic), strip(rip)),
        None => strip(panic),
    })
}

/// Says `what` on stderr and appends it to `log`, if given.
fn record_incident(log: Option<&Path>, what: &str) {
    eprintln!("kiln-tests: {what}");
    let Some(path) = log else {
        return;
    };
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| writeln!(f, "{what}"));
    if let Err(e) = appended {
        eprintln!(
            "kiln-tests: could not record that in {}: {e}",
            path.display()
        );
    }
}

/// Writes the test-bed host's initramfs for `job` to `out`.
fn write_image(job: &Job, out: &Path) -> Result<()> {
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = cpio::Writer::new(BufWriter::new(file));
    for dir in ["/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/files"] {
        w.dir(dir, 0o755)?;
    }
    busybox::add_to(&mut w)?;
    busybox::add_console_nodes(&mut w)?;
    host_tools::add_to(&mut w)?;
    w.file("/bin/kiln", 0o755, &read(job.kiln)?)?;
    w.file("/bin/kiln-gitlab", 0o755, &read(job.kiln_gitlab)?)?;
    w.file("/guest/vmlinux", 0o644, &read(&job.guest.vmlinux)?)?;
    w.file("/guest/bzImage", 0o644, &read(&job.guest.bzimage)?)?;
    w.file("/guest/initrd.cpio", 0o644, job.guest_initrd)?;
    for (name, data) in job.files {
        w.file(&format!("/files/{name}"), 0o755, data)?;
    }
    w.file("/run-test.sh", 0o755, job.script.as_bytes())?;
    w.file("/init", 0o755, TESTBED_INIT.as_bytes())?;
    w.finish()?.flush()?;
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// PID 1 of the test-bed host.
const TESTBED_INIT: &str = r#"#!/bin/sh
export PATH=/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /run
# KVM is built in, so /dev/kvm normally exists already; give devtmpfs a bounded moment.
i=0
while [ ! -e /dev/kvm ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /dev/kvm ] || echo "kiln-testbed: /dev/kvm did not appear (no KVM_AMD, or no SVM in QEMU's CPU)"
cd /tmp
echo KILN-TESTBED-BEGIN
KILN=/bin/kiln KILN_GITLAB=/bin/kiln-gitlab GUEST_VMLINUX=/guest/vmlinux GUEST_BZIMAGE=/guest/bzImage \
  GUEST_INITRD=/guest/initrd.cpio FILES=/files sh /run-test.sh </dev/null 2>&1
rc=$?
printf '\nKILN-TESTBED-EXIT=%d\n' "$rc"
sync
reboot -f
"#;

/// Splits the test bed's console into the script's output and exit code.
fn between_markers(console: &str) -> Result<RunOutput> {
    let begin_line = format!("{BEGIN}\n");
    let Some(start) = console.find(&begin_line).map(|i| i + begin_line.len()) else {
        bail!(
            "the test bed never started the script (no {BEGIN} on its console); console tail:\n{}",
            tail(console, TAIL)
        );
    };
    let body = &console[start..];
    let end = body.rfind(&format!("\n{END}")).and_then(|at| {
        let code = body[at + 1 + END.len()..]
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()?;
        Some((at, code))
    });
    let Some((at, exit_code)) = end else {
        bail!(
            "the test bed stopped without reporting the script's exit code (no {END}); \
             console tail:\n{}",
            tail(console, TAIL)
        );
    };
    Ok(RunOutput {
        console: body[..at].to_string(),
        exit_code,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_delimit_the_output() {
        let console =
            "boot noise\nKILN-TESTBED-BEGIN\nhello\nworld\n\nKILN-TESTBED-EXIT=7\nreboot\n";
        let out = between_markers(console).unwrap();
        assert_eq!(out.console, "hello\nworld\n");
        assert_eq!(out.exit_code, 7);
        // Output without a final newline: the init script's printf supplies it.
        let out = between_markers("KILN-TESTBED-BEGIN\nabc\nKILN-TESTBED-EXIT=0\n").unwrap();
        assert_eq!((out.console.as_str(), out.exit_code), ("abc", 0));
    }

    #[test]
    fn only_the_host_kernel_panicking_is_a_host_panic() {
        let host = "KILN-TESTBED-BEGIN\nout\n[    8.7] RIP: 0010:0xffffffff813a397c\n\
                    [    8.7] Kernel panic - not syncing: Fatal exception in interrupt\n";
        assert_eq!(
            host_panic(host).as_deref(),
            Some("Kernel panic - not syncing: Fatal exception in interrupt (RIP: 0010:0xffffffff813a397c)")
        );
        // A panic before the script started is the host's too.
        assert!(host_panic("Kernel panic - not syncing: VFS\n").is_some());
        // The guest's panic, printed through kiln: the script went on and finished.
        let guest = "KILN-TESTBED-BEGIN\nKernel panic - not syncing: boom\n\nKILN-TESTBED-EXIT=1\n";
        assert_eq!(host_panic(guest), None);
        // No panic at all: a test bed that stopped for another reason is not rebooted.
        assert_eq!(host_panic("KILN-TESTBED-BEGIN\nhalf\n"), None);
    }

    #[test]
    fn missing_markers_are_errors_with_the_tail() {
        let err = between_markers("Kernel panic - not syncing\n").unwrap_err();
        assert!(err.to_string().contains("Kernel panic"), "{err}");
        let err = between_markers("KILN-TESTBED-BEGIN\nhalf\n").unwrap_err();
        assert!(err.to_string().contains("no KILN-TESTBED-EXIT="), "{err}");
        assert!(between_markers("KILN-TESTBED-BEGIN\nKILN-TESTBED-EXIT=x\n").is_err());
    }
}
