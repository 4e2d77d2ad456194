//! Where end-to-end tests run kiln: directly on this machine's `/dev/kvm` when it is
//! hardware virtualization, else inside the nested test bed (a QEMU TCG machine with SVM
//! whose Linux gives kiln a real `/dev/kvm`).
//!
//! Either way a test hands over a POSIX shell script. It runs with these variables set:
//! `$KILN` (the static `kiln`), `$KILN_GITLAB` (the static `kiln-gitlab`), `$GUEST_VMLINUX`, `$GUEST_BZIMAGE` (the guest kernel),
//! `$GUEST_INITRD` (a guest initramfs whose rc prints [`DEFAULT_RC_LINE`] and exits 0) and
//! `$FILES` (a directory holding the test's extra files). Its working directory is
//! writable scratch space.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::kernels::{self, KernelImages};
use crate::tmp::TempDir;
use crate::{artifacts, direct, guest_initramfs, nested};

/// What the default guest initramfs (`$GUEST_INITRD`) prints before it exits 0.
pub const DEFAULT_RC_LINE: &str = "kiln-guest: hello from the default initramfs";
/// How much output an error message quotes.
pub(crate) const TAIL: usize = 4000;

/// The nested test bed's machine.
#[derive(Debug, Clone)]
pub struct Testbed {
    /// The QEMU that emulates the test bed's machine: [`crate::qemu::binary`].
    pub qemu: std::ffi::OsString,
    /// Where runs booted again after the test-bed host panicked are recorded, one line
    /// each: `$KILN_TESTBED_INCIDENTS` (which `cargo xtask test` sets), if set.
    pub incident_log: Option<std::path::PathBuf>,
    /// The test-bed host kernel.
    pub kernel: KernelImages,
    pub memory_mib: u32,
    pub cpus: u32,
    /// The test-bed host's kernel command line: [`crate::TESTBED_CMDLINE`],
    /// [`crate::qemu::tcg_tsc_params`] and `kvm_amd.npt=0` by default
    /// (`KILN_TESTBED_NPT=1`: nested paging).
    pub cmdline: String,
}

impl Testbed {
    /// The test bed with the cached (or freshly built) test-bed host kernel, 2 GiB, 2 CPUs.
    pub fn new() -> Result<Self> {
        Ok(Testbed {
            qemu: crate::qemu::binary(),
            incident_log: std::env::var_os(crate::INCIDENT_LOG_ENV).map(Into::into),
            kernel: kernels::testbed_host().context("building the test-bed host kernel")?,
            memory_mib: 2048,
            cpus: 2,
            // Shadow paging in the test-bed host's KVM: with nested paging, under QEMU TCG's
            // emulation of it, a VM among 8–16 running at once now and then triple-faulted
            // (3 of 10 runs of snapshot_clones_share_memory; one soak run);
            // with npt=0, 11 of 11 runs passed. kiln itself never touches the paging mode.
            // KILN_TESTBED_NPT=1 brings nested paging back, to retest that.
            cmdline: format!(
                "{} {} kvm_amd.npt={}",
                crate::TESTBED_CMDLINE,
                crate::qemu::tcg_tsc_params(),
                if std::env::var("KILN_TESTBED_NPT").as_deref() == Ok("1") {
                    1
                } else {
                    0
                }
            ),
        })
    }
}

/// Where a test's script runs.
#[derive(Debug, Clone)]
pub enum Runner {
    /// On this machine, whose `/dev/kvm` boots Linux guests.
    Direct,
    /// Inside the nested test bed.
    Testbed(Testbed),
}

/// A finished script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutput {
    /// What the script wrote to stdout and stderr (in the test bed: the console between
    /// the markers, which may include kernel messages).
    pub console: String,
    /// The script's exit code (128 + N if a signal N killed it).
    pub exit_code: i32,
}

impl Runner {
    /// `$KILN_TEST_PATH` (`direct` or `testbed`) if set, else `Direct` where the CPU has
    /// hardware virtualization and `Testbed` elsewhere.
    pub fn detect() -> Result<Runner> {
        let direct = match std::env::var("KILN_TEST_PATH").ok().as_deref() {
            Some("direct") => true,
            Some("testbed") => false,
            None | Some("") => kernels::hardware_virtualization(),
            Some(other) => bail!("KILN_TEST_PATH={other:?}: use `direct` or `testbed`"),
        };
        Ok(if direct {
            Runner::Direct
        } else {
            Runner::Testbed(Testbed::new()?)
        })
    }

    /// `direct` or `testbed`: the `"path"` field of benchmark results.
    pub fn path_name(&self) -> &'static str {
        match self {
            Runner::Direct => "direct",
            Runner::Testbed(_) => "testbed",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Runner::Direct => "direct: this machine's /dev/kvm".to_string(),
            Runner::Testbed(t) => format!(
                "testbed: QEMU TCG ({}: EPYC+svm+npt, {} MiB, {} CPUs, {} paging in its KVM) with kernel {}",
                t.qemu.to_string_lossy(),
                t.memory_mib,
                t.cpus,
                if t.cmdline.contains("kvm_amd.npt=0") {
                    "shadow"
                } else {
                    "nested"
                },
                t.kernel.bzimage.display()
            ),
        }
    }

    /// Runs `script` (see the module docs) and returns its output and exit code. `files`
    /// are (relative path, contents) pairs placed under `$FILES`. `timeout` bounds the
    /// whole run, test-bed boot included; running past it is an error that quotes the
    /// output's tail.
    pub fn run(
        &self,
        script: &str,
        files: &[(String, Vec<u8>)],
        timeout: Duration,
    ) -> Result<RunOutput> {
        for (name, _) in files {
            check_relative(name)?;
        }
        let tmp = TempDir::new(self.path_name())?;
        let bins = artifacts::static_binaries()?;
        let job = Job {
            dir: tmp.path(),
            kiln: &bins.kiln,
            kiln_gitlab: &bins.kiln_gitlab,
            guest: &kernels::guest().context("building the guest kernel")?,
            guest_initrd: &guest_initramfs::build(&format!("echo '{DEFAULT_RC_LINE}'\n"))?,
            script,
            files,
            timeout,
        };
        match self {
            Runner::Direct => direct::run(&job),
            Runner::Testbed(testbed) => nested::run(testbed, &job),
        }
    }
}

/// Everything a run needs, gathered by [`Runner::run`].
pub(crate) struct Job<'a> {
    /// A fresh scratch directory for this run.
    pub dir: &'a Path,
    pub kiln: &'a Path,
    pub kiln_gitlab: &'a Path,
    pub guest: &'a KernelImages,
    pub guest_initrd: &'a [u8],
    pub script: &'a str,
    pub files: &'a [(String, Vec<u8>)],
    pub timeout: Duration,
}

fn check_relative(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('/')
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if !ok {
        bail!("file name {name:?} must be a relative path without `.` or `..`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_must_stay_inside_files() {
        assert!(check_relative("g.cpio").is_ok());
        assert!(check_relative("sub/dir/x").is_ok());
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a"] {
            assert!(check_relative(bad).is_err(), "{bad:?}");
        }
    }
}
