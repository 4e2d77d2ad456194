//! The one Debian image the `workload_` tests run real programs in, and the single test-bed
//! run that exercises all of them.
//!
//! Booting the test bed and the workload VM is the expensive part (minutes under QEMU TCG),
//! so one VM runs every workload, each in a section of the job's output that starts with a
//! `WL-SECTION=<name>` line; each test reads its own section ([`Battery::section`]). The
//! first test to ask runs the battery; the others in the same process reuse its output.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use crate::images::{self, StoreImage};
use crate::output::{sections, value};
use crate::Runner;

/// Debian suite of the workload image.
pub const SUITE: &str = "bookworm";

/// Everything the workloads need, installed by debootstrap (which takes no Recommends:
/// hence libc6-dev for gcc). The image is cached under this list (see [`images::debian`]).
pub const PACKAGES: &[&str] = &[
    "bash",
    "ca-certificates",
    "gcc",
    "git",
    "libc6-dev",
    "make",
    "postgresql",
    "python3",
    "util-linux",
];

/// Guest memory for the workload VM: PostgreSQL, gcc and the OOM test's 128 MiB
/// allocation (killed at the cgroup's 32 MiB, never near this) fit.
pub const GUEST_MEMORY_MIB: u32 = 1024;

/// The test-bed machine: the image (a file in its RAM) plus the guest's memory.
const TESTBED_MEMORY_MIB: u32 = 4096;

/// Wall-clock limit for the whole run (test bed, boot, every workload).
const TIMEOUT: Duration = Duration::from_secs(1500);

/// The workload image, from the cache or built once with `kiln image build`.
pub fn image() -> Result<StoreImage> {
    let bins = crate::artifacts::static_binaries()?;
    let image = images::debian(&bins, SUITE, PACKAGES, None)?;
    if let Some(secs) = image.build_secs {
        eprintln!("workload image {} built in {secs:.1} s", image.name);
    }
    Ok(image)
}

/// What the battery's job printed, kept for every test of the process.
pub struct Battery {
    /// The job's stdout and stderr as the test bed's console shows them.
    pub console: String,
    /// The job's exit code (the script ends with 0 whatever the workloads did).
    pub exit: Option<i32>,
}

impl Battery {
    /// The output of section `name` (between its `WL-SECTION=` line and the next), or an
    /// error quoting the whole console when the section never started.
    pub fn section(&self, name: &str) -> Result<&str> {
        sections(&self.console, "WL-SECTION")
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, body)| body)
            .ok_or_else(|| {
                anyhow!(
                    "the workload job printed no section {name:?} (exit {:?}); console:\n{}",
                    self.exit,
                    self.console
                )
            })
    }
}

/// Runs `job` (a /bin/sh script) once per process in a VM booted from the workload image
/// with 2 vCPUs, and returns its output; later calls get the same result.
pub fn battery(job: &str) -> Result<&'static Battery> {
    static RESULT: OnceLock<Result<Battery, String>> = OnceLock::new();
    static RUNNING: Mutex<()> = Mutex::new(());
    let _one = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    RESULT
        .get_or_init(|| run(job).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("the workload run failed: {e}"))
}

fn run(job: &str) -> Result<Battery> {
    let image = image()?;
    let runner = match Runner::detect()? {
        Runner::Testbed(mut t) => {
            t.memory_mib = t.memory_mib.max(TESTBED_MEMORY_MIB);
            Runner::Testbed(t)
        }
        direct => direct,
    };
    let script = format!(
        r#"
cat > job.sh <<'KILN_WORKLOAD_JOB'
{job}
KILN_WORKLOAD_JOB
"$KILN" job --kernel "$GUEST_VMLINUX" --image {name} --store "$FILES/store" \
  --memory {GUEST_MEMORY_MIB} --vcpus 2 --script job.sh > job.out 2> job.err
echo "WL-EXIT=$?"
echo "--- job stdout"; cat job.out
echo "--- job stderr"; cat job.err
"#,
        name = image.name
    );
    let files = image.files("store")?;
    let started = Instant::now();
    let out = runner
        .run(&script, &files, TIMEOUT)
        .context("running the workload battery")?;
    eprintln!(
        "workload battery: test-bed run took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let exit = value(&out.console, "WL-EXIT").and_then(|v| v.parse().ok());
    Ok(Battery {
        console: out.console,
        exit,
    })
}
