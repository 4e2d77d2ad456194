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
/// hence libc6-dev for gcc). Docker's workload makes its image from busybox-static. The image is cached under this list (see [`images::debian`]).
pub const PACKAGES: &[&str] = &[
    "bash",
    "busybox-static",
    "ca-certificates",
    "docker.io",
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
const TESTBED_MEMORY_MIB: u32 = 5120;

/// Wall-clock limit for the whole run (test bed, boot, every workload).
const TIMEOUT: Duration = Duration::from_secs(1800);

/// How long `kiln job --docker` waits for dockerd (the test bed runs some 20–30 times
/// slower than hardware).
const DOCKER_TIMEOUT_SECS: u64 = 600;

/// The workload VM's TAP in the test bed.
const TAP: &str = "kilnwl0";

/// The workload image, from the cache or built once with `kiln image build`.
pub fn image() -> Result<StoreImage> {
    let bins = crate::artifacts::static_binaries()?;
    let image = images::debian(&bins, SUITE, PACKAGES, None)?;
    if let Some(secs) = image.build_secs {
        eprintln!("workload image {} built in {secs:.1} s", image.name);
    }
    Ok(image)
}

/// The test-bed host's address on the workload VM's TAP, where the battery's script serves
/// `http://WL_HOST_IP:8080/token` (busybox httpd); the job gets it as `$WL_HOST_IP`.
pub const HOST_IP: &str = "10.0.9.1";
/// The workload VM's address on that TAP.
pub const GUEST_IP: &str = "10.0.9.2";

/// What the battery's job printed, kept for every test of the process.
pub struct Battery {
    /// The test-bed script's output: the job's stdout and stderr, and around them what the
    /// script itself printed (`WL-HOST-TOKEN`, the `docker-absent` section).
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
/// with 2 vCPUs, Docker started (`kiln job --docker`) and a network on a TAP whose host
/// side serves a random token; then, in the `docker-absent` section, two jobs in a busybox
/// initramfs without Docker: one calling `docker`, one asking for `--docker`. Returns the
/// output; later calls get the same result.
pub fn battery(job: &str) -> Result<&'static Battery> {
    static RESULT: OnceLock<Result<Battery, String>> = OnceLock::new();
    static RUNNING: Mutex<()> = Mutex::new(());
    let _one = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    RESULT
        .get_or_init(|| run(job).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("the workload run failed: {e}"))
}

/// Where VMs of the workload image run: [`Runner::detect`], with a test bed large enough
/// to hold the image.
pub fn runner() -> Result<Runner> {
    Ok(match Runner::detect()? {
        Runner::Testbed(mut t) => {
            t.memory_mib = t.memory_mib.max(TESTBED_MEMORY_MIB);
            Runner::Testbed(t)
        }
        direct => direct,
    })
}

fn run(job: &str) -> Result<Battery> {
    let image = image()?;
    let runner = runner()?;
    let script = format!(
        r#"
mkdir -p www
token="kiln-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
printf '%s' "$token" > www/token
echo "WL-HOST-TOKEN=$token"
"$KILN" net setup --tap {TAP} --host-ip {HOST_IP}/24 || echo "WL-TAP-FAILED"
httpd -f -p {HOST_IP}:8080 -h "$PWD/www" &
httpd=$!
cat > job.sh <<'KILN_WORKLOAD_JOB'
{job}
KILN_WORKLOAD_JOB
"$KILN" job --kernel "$GUEST_VMLINUX" --image {name} --store "$FILES/store" \
  --memory {GUEST_MEMORY_MIB} --vcpus 2 --net tap={TAP},ip={GUEST_IP}/24,gw={HOST_IP} \
  --docker --docker-timeout {DOCKER_TIMEOUT_SECS} --env WL_HOST_IP={HOST_IP} --json \
  --script job.sh > job.out 2> job.err
echo "WL-EXIT=$?"
kill $httpd
"$KILN" net teardown --tap {TAP}
echo "--- job stdout"; cat job.out
echo "--- job stderr"; cat job.err
echo "WL-SECTION=docker-absent"
printf 'docker version\nrc=$?\necho "WL-NODOCKER-RC=$rc"\nexit $rc\n' > nodocker.sh
"$KILN" job --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 256 \
  --script nodocker.sh > nodocker.out 2> nodocker.err
echo "WL-NODOCKER-EXIT=$?"
cat nodocker.out
echo "WL-NODOCKER-STDERR=$(cat nodocker.err)"
echo 'echo WL-ASKS-SCRIPT-RAN' > asks.sh
"$KILN" job --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 256 --docker \
  --script asks.sh > asks.out 2> asks.err
echo "WL-ASKS-EXIT=$?"
echo "WL-ASKS-STDOUT=$(cat asks.out)"
echo "WL-ASKS-STDERR-LINES=$(wc -l < asks.err)"
echo "WL-ASKS-STDERR=$(cat asks.err)"
"#,
        name = image.name,
    );
    let mut files = image.files("store")?;
    files.push((
        "agent.cpio".to_string(),
        crate::guest_initramfs::GuestInitramfs::new().build()?,
    ));
    // The TAP and the server live in a network namespace of their own (on the direct path
    // they would otherwise be the machine's).
    let script = crate::net_download::isolated(&script, &mut files);
    let started = Instant::now();
    let out = runner
        .run(&script, &files, TIMEOUT)
        .context("running the workload battery")?;
    eprintln!(
        "workload battery: test-bed run took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // kiln job's --json line: boot_ms, job_ms and docker_ms (dockerd's start-to-ready).
    if let Some(report) = crate::output::last_json(&out.console) {
        eprintln!("workload battery: kiln job reported {report}");
    }
    let exit = value(&out.console, "WL-EXIT").and_then(|v| v.parse().ok());
    Ok(Battery {
        console: out.console,
        exit,
    })
}
