//! `cargo xtask setup`: the Debian packages and the two kernels that tests, demo and
//! benches need. Idempotent: a second run installs nothing and builds nothing. Reports
//! go to stderr, so that `cargo xtask bench`'s stdout stays JSON lines.

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// Debian packages the build and the test bed need.
///
/// - kernels: linux-source-6.12 and its build tools (kernel-config/build.sh; lz4 compresses
///   the bzImage)
/// - test bed: qemu-system-x86 (QEMU TCG with nested SVM), busybox-static and cpio for the
///   test-bed and guest initramfs images, bash-static for guests that run GitLab jobs,
///   gzip and zstd (with xz-utils) for the compressed initramfs images the `boot_` tests
///   boot
/// - disk tests: e2fsprogs (`mkfs.ext4 -d` builds the ext4 images the `image_` tests boot)
/// - image tests: debootstrap (`kiln image build` makes the Debian image that
///   `image_debian_build_boots_and_runs_git_and_apt` boots) and tar (`kiln image import`)
/// - image pull tests: docker-registry (the loopback registry `kiln image pull` is tested
///   against, also served inside the test bed for the GitLab driver's pulls),
///   apache2-utils (`htpasswd` writes its bcrypt password file) and ca-certificates
///   (kiln's registry client wants the system's roots, even for plain HTTP)
/// - fuzzing: g++ (libfuzzer-sys compiles libFuzzer, which is C++, for the fuzz step)
/// - network policy tests: nftables (`kiln net setup --nat` installs its rules with `nft`)
///   and iproute2 (the tests' network namespaces and veth pairs)
/// - nesting tests: openssh-client (`ssh` logs into the nesting server's VMs with a
///   password, as GitLab Runner does)
/// - the package's test: lintian (the Debian package `cargo xtask dist` builds must have
///   no lintian error)
pub const PACKAGES: &[&str] = &[
    "linux-source-6.12",
    "bc",
    "flex",
    "bison",
    "libelf-dev",
    "libssl-dev",
    "make",
    "gcc",
    "xz-utils",
    "lz4",
    "qemu-system-x86",
    "busybox-static",
    "bash-static",
    "cpio",
    "gzip",
    "zstd",
    "e2fsprogs",
    "debootstrap",
    "tar",
    "docker-registry",
    "apache2-utils",
    "ca-certificates",
    "g++",
    "nftables",
    "iproute2",
    "openssh-client",
    "lintian",
];

pub fn run() -> Result<()> {
    let missing = missing_packages()?;
    if missing.is_empty() {
        eprintln!("setup: packages: all {} present", PACKAGES.len());
    } else {
        install(&missing)?;
        eprintln!("setup: packages: installed {}", missing.join(" "));
    }
    for (name, build) in [
        ("guest", kiln_tests::kernels::guest as fn() -> _),
        ("testbed-host", kiln_tests::kernels::testbed_host),
    ] {
        let start = Instant::now();
        let images = build().with_context(|| format!("building the {name} kernel"))?;
        eprintln!(
            "setup: {name} kernel: {} ({:.1} s)",
            images.dir.display(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn missing_packages() -> Result<Vec<&'static str>> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(PACKAGES)
        .stderr(Stdio::null())
        .output()
        .context("could not run dpkg-query: kiln's set-up needs a Debian-based machine")?;
    // dpkg-query exits 1 when some package is unknown; its stdout still lists the known ones.
    let listed = String::from_utf8_lossy(&output.stdout);
    Ok(PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !listed.lines().any(|line| {
                line.split_once(' ')
                    .is_some_and(|(name, status)| name == *p && status == "install ok installed")
            })
        })
        .collect())
}

fn is_root() -> bool {
    // /proc/self belongs to the effective user of the process reading it.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn install(packages: &[&str]) -> Result<()> {
    if !is_root() {
        bail!(
            "missing packages: {0}; run `cargo xtask setup` as root, or install them with \
             `sudo apt-get update && sudo apt-get install {0}`",
            packages.join(" ")
        );
    }
    eprintln!("setup: installing {}", packages.join(" "));
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend_from_slice(packages);
    apt(&args)
}

fn apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(["-o", "DPkg::Lock::Timeout=600"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(std::io::stderr())
        .status()
        .context("could not run apt-get")?;
    if !status.success() {
        bail!("`apt-get {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
