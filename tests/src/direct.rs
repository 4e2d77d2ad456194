//! The direct path: the script runs on this machine, whose `/dev/kvm` boots Linux.

use std::process::Command;

use anyhow::{anyhow, Context, Result};

use crate::process::{exit_code, run_captured};
use crate::testbed::{Job, RunOutput, TAIL};

/// Runs the job's script with `sh` on this machine.
pub(crate) fn run(job: &Job) -> Result<RunOutput> {
    let dir = job.dir;
    let files_dir = dir.join("files");
    let work = dir.join("work");
    std::fs::create_dir_all(&files_dir)?;
    std::fs::create_dir_all(&work)?;
    for (name, data) in job.files {
        let path = files_dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap_or(&files_dir))?;
        std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
    }
    std::fs::write(dir.join("guest-initrd.cpio"), job.guest_initrd)?;
    std::fs::write(dir.join("run-test.sh"), job.script)?;
    let mut cmd = Command::new("sh");
    cmd.arg(dir.join("run-test.sh"))
        .current_dir(&work)
        .env("KILN", job.kiln)
        .env("KILN_GITLAB", job.kiln_gitlab)
        .env("GUEST_VMLINUX", &job.guest.vmlinux)
        .env("GUEST_BZIMAGE", &job.guest.bzimage)
        .env("GUEST_INITRD", dir.join("guest-initrd.cpio"))
        .env("FILES", &files_dir);
    let run = run_captured(cmd, job.timeout)?;
    let status = run.status.ok_or_else(|| {
        anyhow!(
            "the script did not finish within {:?}; output tail:\n{}",
            job.timeout,
            run.tail(TAIL)
        )
    })?;
    Ok(RunOutput {
        console: run.output,
        exit_code: exit_code(status),
    })
}
