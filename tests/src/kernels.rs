//! The guest and test-bed host kernels, built (once, then cached) by `kernel-config/build.sh`.
//!
//! The first call on a fresh machine builds the kernel (a few minutes on 2 cores); later
//! calls return at once from `${KILN_CACHE_DIR:-$HOME/.cache/kiln}/kernels/`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The images of one kernel build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelImages {
    /// The cache directory holding the images and the final `config`.
    pub dir: PathBuf,
    /// The uncompressed ELF image (PVH / 64-bit boot entry).
    pub vmlinux: PathBuf,
    /// The bzImage (Linux boot protocol), what QEMU boots the test bed with.
    pub bzimage: PathBuf,
}

impl KernelImages {
    /// The images inside a build output directory; checks that they are there.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        let images = KernelImages {
            vmlinux: dir.join("vmlinux"),
            bzimage: dir.join("bzImage"),
            dir,
        };
        for file in [&images.vmlinux, &images.bzimage] {
            if !file.is_file() {
                bail!(
                    "kernel image {} is missing; delete {} and run kernel-config/build.sh again",
                    file.display(),
                    images.dir.display()
                );
            }
        }
        Ok(images)
    }
}

/// The CI guest kernel (`kernel-config/guest.config`).
pub fn guest() -> Result<KernelImages> {
    build("guest")
}

/// The nested test-bed host kernel (`guest.config` + `testbed-host.config`).
pub fn testbed_host() -> Result<KernelImages> {
    build("testbed-host")
}

/// The guest kernel built from the `kernel-config/guest.config` of git revision `rev` of
/// this checkout (with this checkout's build script), to measure a config change against:
/// cached like the current one, under the hash of that fragment.
pub fn guest_at_revision(rev: &str) -> Result<KernelImages> {
    let out = Command::new("git")
        .current_dir(repo_root())
        .args(["show", &format!("{rev}:kernel-config/guest.config")])
        .output()
        .context("running git show")?;
    if !out.status.success() {
        bail!(
            "no kernel-config/guest.config at revision {rev:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let dir = crate::tmp::TempDir::new("kernel-rev")?;
    std::fs::write(dir.path().join("guest.config"), &out.stdout)?;
    let script = dir.path().join("build.sh");
    std::fs::copy(repo_root().join("kernel-config/build.sh"), &script)
        .context("copying kernel-config/build.sh")?;
    build_with(&script, "guest")
}

/// True if the CPU offers hardware virtualization (`vmx` or `svm` in /proc/cpuinfo), i.e.
/// whether `/dev/kvm` can boot an unmodified guest kernel directly.
pub fn hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| cpuinfo_has_virtualization(&info))
        .unwrap_or(false)
}

fn cpuinfo_has_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(key, _)| key.trim() == "flags")
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The repository root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("kiln-tests lives one level below the repository root")
        .to_path_buf()
}

/// Runs `kernel-config/build.sh NAME`, passing its progress (stderr) through, and returns
/// the images in the directory named by the last line of its stdout.
fn build(name: &str) -> Result<KernelImages> {
    build_with(&repo_root().join("kernel-config/build.sh"), name)
}

/// Runs the build script `script` (which reads its fragments beside itself) for `name`.
fn build_with(script: &Path, name: &str) -> Result<KernelImages> {
    if !script.is_file() {
        bail!(
            "{} not found; is this a full kiln checkout?",
            script.display()
        );
    }
    let mut child = Command::new("bash")
        .arg(script)
        .arg(name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("could not start {}", script.display()))?;
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .context("build.sh stdout was not captured")?
        .read_to_string(&mut stdout)
        .context("reading the output of kernel-config/build.sh")?;
    let status = child.wait().context("waiting for kernel-config/build.sh")?;
    if !status.success() {
        bail!(
            "kernel-config/build.sh {name} failed ({status}); its messages above say why \
             (missing packages: run `cargo xtask setup` as root)"
        );
    }
    let dir = last_line(&stdout).with_context(|| {
        format!("kernel-config/build.sh {name} succeeded but printed no output directory")
    })?;
    KernelImages::in_dir(dir)
}

fn last_line(stdout: &str) -> Option<&str> {
    stdout.lines().map(str::trim).rfind(|l| !l.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_flags_are_parsed() {
        let amd = "processor\t: 0\nflags\t\t: fpu vme svm sse\n";
        let intel = "flags\t\t: fpu vmx\n";
        let pvm = "flags\t\t: fpu vme hypervisor\nbugs\t\t: svm_thing\n";
        assert!(cpuinfo_has_virtualization(amd));
        assert!(cpuinfo_has_virtualization(intel));
        assert!(!cpuinfo_has_virtualization(pvm));
        assert!(!cpuinfo_has_virtualization(""));
    }

    #[test]
    fn last_line_skips_trailing_blank_lines() {
        assert_eq!(last_line("a\nb\n\n"), Some("b"));
        assert_eq!(last_line("/x/y\n"), Some("/x/y"));
        assert_eq!(last_line(""), None);
    }

    #[test]
    fn missing_images_are_reported() {
        let err = KernelImages::in_dir("/nonexistent/kiln-kernel").unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
