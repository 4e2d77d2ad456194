//! The Debian package: built as `cargo xtask dist` builds it (`kiln_dist::build`), its
//! contents checked with `dpkg-deb -c` and lintian, then unpacked into the root of a test-bed host
//! (busybox's `dpkg-deb -x`), where `kiln job` with no flags but the command boots the
//! packaged kernel and initramfs and `kiln doctor` finds everything a job needs.
//!
//! Always in the test bed, even where this machine could run the guest directly: the
//! package is unpacked into `/` of the machine it is tested on, which must be a throwaway
//! one.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln_tests::output::value;
use kiln_tests::tmp::TempDir;
use kiln_tests::{Runner, Testbed};

const TIMEOUT: Duration = Duration::from_secs(400);

/// Runs in the test-bed host, whose own `$KILN` and guest files are not used: only what
/// the package put in `/usr`. `$HOME` has no kernel build cache there, and `$KILN_HOME` is
/// unset, so the defaults can only come from `/usr/lib/kiln`.
const SCRIPT: &str = r#"
unset KILN_HOME
dpkg-deb -x "$FILES/kiln.deb" /
echo "KILN-UNPACK-EXIT=$?"
/usr/bin/kiln doctor > doctor.out 2>&1
echo "KILN-DOCTOR-EXIT=$?"
echo KILN-DOCTOR-BEGIN
cat doctor.out
echo KILN-DOCTOR-END
/usr/bin/kiln job -- uname -r > job.out 2> job.err
echo "KILN-JOB-EXIT=$?"
echo "KILN-JOB-STDOUT=$(cat job.out)"
echo KILN-JOB-STDERR-BEGIN
cat job.err
echo KILN-JOB-STDERR-END
"#;

/// The release in a kernel image's `Linux version RELEASE (…` banner.
fn linux_release(image: &[u8]) -> Option<String> {
    let banner = b"Linux version ";
    let at = image.windows(banner.len()).position(|w| w == banner)? + banner.len();
    let end = image[at..].iter().position(|&b| b == b' ')?;
    String::from_utf8(image[at..at + end].to_vec()).ok()
}

/// The paths `dpkg-deb -c` lists, without the leading `.`.
fn contents(deb: &std::path::Path) -> Result<Vec<String>> {
    let out = Command::new("dpkg-deb")
        .arg("-c")
        .arg(deb)
        .output()
        .context("running dpkg-deb -c")?;
    ensure!(
        out.status.success(),
        "dpkg-deb -c: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_string())
        .collect())
}

#[test]
fn install_package_runs_a_default_job_and_doctor_is_ok() -> Result<()> {
    let out = TempDir::new("dist")?;
    let package = kiln_dist::build(out.path())?;
    let listed = contents(&package.deb)?;
    for path in [
        "/usr/bin/kiln",
        "/usr/bin/kiln-agent",
        "/usr/bin/kiln-gitlab",
        "/usr/lib/kiln/vmlinux",
        "/usr/lib/kiln/initramfs.cpio",
        "/usr/lib/systemd/system/kiln-nesting.service",
        "/usr/lib/systemd/system/kiln-net@.service",
        "/usr/share/man/man1/kiln.1.gz",
        "/usr/share/man/man1/kiln-job.1.gz",
        "/usr/share/man/man1/kiln-agent.1.gz",
        "/usr/share/man/man1/kiln-gitlab-nesting-serve.1.gz",
        "/usr/share/bash-completion/completions/kiln",
        "/usr/share/zsh/vendor-completions/_kiln-gitlab",
        "/usr/share/doc/kiln/copyright",
        "/usr/share/doc/kiln/changelog.Debian.gz",
    ] {
        ensure!(listed.iter().any(|p| p == path), "{path} not in {listed:?}");
    }
    // Its findings are printed; an error fails the test.
    print!("{}", kiln_dist::lintian(&package.deb)?);
    let staged = out.path().join(format!(
        "kiln_{}_amd64/usr/lib/kiln/vmlinux",
        package.version
    ));
    let release = linux_release(&std::fs::read(&staged)?)
        .context("no `Linux version` banner in the packaged kernel")?;

    let runner = Runner::Testbed(Testbed::new()?);
    let files = [("kiln.deb".to_string(), std::fs::read(&package.deb)?)];
    let run = runner.run(SCRIPT, &files, TIMEOUT)?;
    let console = &run.console;
    ensure!(run.exit_code == 0, "the script failed: {console}");
    ensure!(
        value(console, "KILN-UNPACK-EXIT") == Some("0"),
        "dpkg-deb -x: {console}"
    );
    let doctor = section(console, "KILN-DOCTOR")?;
    ensure!(
        value(console, "KILN-DOCTOR-EXIT") == Some("0"),
        "kiln doctor:\n{doctor}"
    );
    // `kiln doctor`'s lines: verdict, check, detail.
    let ok = |check: &str, detail: &str| format!("{:<5} {check:<15} {detail}", "ok");
    for line in [
        ok("guest kernel", "/usr/lib/kiln/vmlinux"),
        ok("initramfs", "/usr/lib/kiln/initramfs.cpio"),
        "kiln doctor: this host can run kiln jobs".to_string(),
    ] {
        ensure!(
            doctor.lines().any(|l| l.trim_end() == line),
            "{line:?} in:\n{doctor}"
        );
    }
    let stderr = section(console, "KILN-JOB-STDERR")?;
    ensure!(
        value(console, "KILN-JOB-EXIT") == Some("0"),
        "kiln job -- uname -r: stderr:\n{stderr}\nconsole:\n{console}"
    );
    ensure!(
        value(console, "KILN-JOB-STDOUT") == Some(release.as_str()),
        "kiln job -- uname -r printed {:?}, the packaged kernel is {release}",
        value(console, "KILN-JOB-STDOUT")
    );
    Ok(())
}

/// The lines between `KEY-BEGIN` and `KEY-END`.
fn section<'a>(console: &'a str, key: &str) -> Result<&'a str> {
    let begin = format!("{key}-BEGIN\n");
    let start = console
        .find(&begin)
        .with_context(|| format!("no {key}-BEGIN in: {console}"))?
        + begin.len();
    let len = console[start..]
        .find(&format!("{key}-END"))
        .with_context(|| format!("no {key}-END in: {console}"))?;
    Ok(&console[start..start + len])
}

#[test]
fn install_linux_release_is_read_from_the_banner() {
    let image = b"\x7fELF....Linux version 6.12.118 (root@vm) (gcc ...)";
    assert_eq!(linux_release(image).as_deref(), Some("6.12.118"));
    assert_eq!(linux_release(b"no banner"), None);
}
