//! The nested path: the script runs inside the test bed, a QEMU TCG machine with SVM whose
//! Linux (the test-bed host kernel) gives kiln a real `/dev/kvm`.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::process::{run_captured, tail};
use crate::qemu::Qemu;
use crate::testbed::{Job, RunOutput, Testbed, TAIL};
use crate::{busybox, cpio};

/// The test-bed host's kernel command line.
pub const TESTBED_CMDLINE: &str = "console=ttyS0 panic=-1 quiet reboot=t";
const BEGIN: &str = "KILN-TESTBED-BEGIN";
const END: &str = "KILN-TESTBED-EXIT=";

/// Boots the test bed with the job in its initramfs and reads the result off its console.
pub(crate) fn run(testbed: &Testbed, job: &Job) -> Result<RunOutput> {
    let initrd = job.dir.join("testbed.cpio");
    write_image(job, &initrd)?;
    let qemu = Qemu {
        memory_mib: testbed.memory_mib,
        cpus: testbed.cpus,
        ..Qemu::new(&testbed.kernel.bzimage, &initrd, &testbed.cmdline)
    };
    let run = run_captured(qemu.command(), job.timeout)?;
    let console = run.output.replace("\r\n", "\n");
    if run.status.is_none() {
        bail!(
            "the test bed did not finish within {:?}; console tail:\n{}",
            job.timeout,
            tail(&console, TAIL)
        );
    }
    between_markers(&console)
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
    fn missing_markers_are_errors_with_the_tail() {
        let err = between_markers("Kernel panic - not syncing\n").unwrap_err();
        assert!(err.to_string().contains("Kernel panic"), "{err}");
        let err = between_markers("KILN-TESTBED-BEGIN\nhalf\n").unwrap_err();
        assert!(err.to_string().contains("no KILN-TESTBED-EXIT="), "{err}");
        assert!(between_markers("KILN-TESTBED-BEGIN\nKILN-TESTBED-EXIT=x\n").is_err());
    }
}
