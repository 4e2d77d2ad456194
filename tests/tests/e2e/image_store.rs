//! Store images in the test bed: a Debian image made by `kiln image build`
//! (debootstrap on the host, cached) and a busybox image made by `kiln image import` of a
//! tarball each boot with `kiln job --image NAME --store DIR` and run a job; and a GitLab
//! job through `kiln-gitlab` whose `CI_JOB_IMAGE` names the Debian store image.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kiln_tests::images::{self, StoreImage};
use kiln_tests::output::value;
use kiln_tests::tmp::TempDir;
use kiln_tests::Runner;

/// The test bed with room for a store image in its initramfs (the image is a file in RAM
/// there, next to the guest's memory).
fn runner_for_images() -> Result<Runner> {
    Ok(match Runner::detect()? {
        Runner::Testbed(mut t) => {
            t.memory_mib = t.memory_mib.max(3072);
            Runner::Testbed(t)
        }
        direct => direct,
    })
}

/// Runs `job` (a shell script) with `kiln job --image` in the test bed; returns the console
/// with `KILN-JOB` (exit code), `KILN-OUT` (stdout, lines joined by `|`) and `KILN-JSON`.
fn job_in_testbed(image: &StoreImage, job: &str, timeout: Duration) -> Result<String> {
    let runner = runner_for_images()?;
    let script = format!(
        r#"
S="$FILES/store"
echo "KILN-LS=$("$KILN" image ls --store "$S" | awk 'NR > 1 {{print $1}}' | tr '\n' ' ')"
cat > job.sh <<'JOB'
{job}
JOB
"$KILN" job --kernel "$GUEST_VMLINUX" --image {name} --store "$S" --memory 256 \
  --script job.sh --json > job.out 2> job.err
echo "KILN-JOB=$?"
echo "KILN-OUT=$(tr '\n' '|' < job.out)"
echo "KILN-JSON=$(tail -n 1 job.err)"
echo "--- job stderr"; cat job.err
"#,
        name = image.name
    );
    let files = image.files("store")?;
    let started = Instant::now();
    let out = runner.run(&script, &files, timeout)?;
    eprintln!(
        "test-bed run took {:.1} s ({} MiB image)",
        started.elapsed().as_secs_f64(),
        files.iter().map(|(_, d)| d.len()).sum::<usize>() >> 20
    );
    let console = out.console;
    let ls = value(&console, "KILN-LS").unwrap_or_default();
    ensure!(
        ls.split_whitespace().any(|n| n == image.name),
        "`kiln image ls` in the test bed does not list {}: {console}",
        image.name
    );
    ensure!(
        value(&console, "KILN-JOB") == Some("0"),
        "the job failed: {console}"
    );
    if let Some(json) = value(&console, "KILN-JSON") {
        eprintln!("kiln job --json: {json}");
    }
    Ok(console)
}

/// `kiln image build --packages bash,git,ca-certificates` and a job that runs
/// `git --version` and counts the installed packages with apt in a VM booted from it.
#[test]
fn image_debian_build_boots_and_runs_git_and_apt() -> Result<()> {
    let bins = kiln_tests::artifacts::static_binaries()?;
    let image = images::debian(&bins, "bookworm", &["bash", "git", "ca-certificates"], None)?;
    let meta = std::fs::read_to_string(image.dir().join("image.json"))?;
    let meta: serde_json::Value = serde_json::from_str(&meta)?;
    eprintln!(
        "image {}: {} MiB filesystem, {} MiB of files, build {}",
        image.name,
        meta["size_bytes"].as_u64().unwrap_or(0) >> 20,
        meta["content_bytes"].as_u64().unwrap_or(0) >> 20,
        image
            .build_secs
            .map_or("cached".to_string(), |s| format!("{s:.1} s"))
    );
    let console = job_in_testbed(
        &image,
        "bash -c 'git --version && apt list --installed | wc -l'",
        Duration::from_secs(600),
    )?;
    let out = value(&console, "KILN-OUT").unwrap_or_default();
    let lines: Vec<&str> = out.split('|').filter(|l| !l.is_empty()).collect();
    let [git, count] = lines[..] else {
        bail!("expected two lines (git version, package count), got {out:?}: {console}");
    };
    ensure!(git.starts_with("git version 2."), "{git:?}: {console}");
    let count: u32 = count.trim().parse().context("the package count")?;
    // apt prints "Listing..." first, then one line per installed package.
    ensure!(
        count > 50,
        "only {count} lines from apt list --installed: {console}"
    );
    eprintln!("guest: {git}; apt list --installed: {count} lines");
    Ok(())
}

/// A busybox root filesystem with `/etc/image-marker`, tarred and brought into a store
/// under `tmp` with `kiln image import` as image `bb`.
fn busybox_image(tmp: &TempDir) -> Result<StoreImage> {
    let bins = kiln_tests::artifacts::static_binaries()?;
    let tree = tmp.path().join("tree");
    let bb = kiln_tests::busybox::busybox()?;
    std::fs::create_dir_all(tree.join("bin"))?;
    std::fs::create_dir_all(tree.join("etc"))?;
    std::fs::write(tree.join("bin/busybox"), &bb.binary)?;
    std::fs::set_permissions(
        tree.join("bin/busybox"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    for applet in &bb.applets {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet))?;
    }
    std::fs::write(tree.join("etc/image-marker"), "imported-from-a-tarball\n")?;
    let tarball = tmp.path().join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-cf")
        .arg(&tarball)
        .arg("-C")
        .arg(&tree)
        .arg(".")
        .status()
        .context("running tar")?;
    ensure!(status.success(), "tar failed");
    let image = images::import(&bins, &tmp.path().join("store"), "bb", &tarball)?;
    eprintln!(
        "kiln image import: {:.2} s, {} MiB image",
        image.build_secs.unwrap_or(0.0),
        std::fs::metadata(image.dir().join("rootfs.ext4"))?.len() >> 20
    );
    Ok(image)
}

/// Two VMs booted at once from the same store image each write a
/// file of their own to `/`; neither sees the other's, and the image is unchanged.
#[test]
fn image_vms_from_one_image_see_only_their_own_root_writes() -> Result<()> {
    let tmp = TempDir::new("image-two-vms")?;
    let image = busybox_image(&tmp)?;
    let script = kiln_tests::shell::PRELUDE.to_string()
        + &format!(
            r#"
S="$FILES/store"
B="$S/{name}/rootfs.ext4"
before=$(sha256sum "$B" | cut -d' ' -f1)
for i in 0 1; do
  "$KILN" run --kernel "$GUEST_VMLINUX" --image {name} --store "$S" --memory 128     --vsock "$PWD/v$i.sock" --serial null 2> "run$i.err" &
  eval "vm$i=$!"
done
for i in 0 1; do
  eval "pid=\$vm$i"
  echo "KILN-READY-$i=$(wait_exec "$PWD/v$i.sock" $pid)"
  "$KILN" exec --vsock "$PWD/v$i.sock" -- sh -c "echo vm-$i > /written-by-vm$i && sync"
  echo "KILN-WRITE-$i=$?"
done
for i in 0 1; do
  echo "KILN-SEES-$i=$("$KILN" exec --vsock "$PWD/v$i.sock" -- sh -c 'cat /written-by-vm*' | tr '
' ' ')"
  eval "pid=\$vm$i"
  kill -TERM $pid 2>/dev/null
  wait $pid
done
[ "$(sha256sum "$B" | cut -d' ' -f1)" = "$before" ] && echo "KILN-BASE-UNCHANGED=yes"
echo "KILN-PROCESSES-LEFT=$(pidof kiln | wc -w)"
for i in 0 1; do echo "--- run$i.err"; cat "run$i.err"; done
"#,
            name = image.name
        );
    let out =
        runner_for_images()?.run(&script, &image.files("store")?, Duration::from_secs(300))?;
    let console = &out.console;
    for i in 0..2 {
        let key = |k: &str| format!("KILN-{k}-{i}");
        ensure!(
            value(console, &key("READY")) == Some("yes"),
            "VM {i}: {console}"
        );
        ensure!(
            value(console, &key("WRITE")) == Some("0"),
            "VM {i} write: {console}"
        );
        let own = format!("vm-{i}");
        ensure!(
            value(console, &key("SEES")) == Some(own.as_str()),
            "VM {i} should see its own file only: {console}"
        );
    }
    ensure!(
        value(console, "KILN-BASE-UNCHANGED") == Some("yes"),
        "the image changed: {console}"
    );
    ensure!(
        value(console, "KILN-PROCESSES-LEFT") == Some("0"),
        "kiln left running: {console}"
    );
    Ok(())
}

/// `kiln image import` of a busybox tarball (a filesystem with a static busybox, as a
/// minimal container would export it) boots and runs a job with the agent it added.
#[test]
fn image_import_of_a_tarball_boots_and_runs_a_job() -> Result<()> {
    let tmp = TempDir::new("image-import")?;
    let image = busybox_image(&tmp)?;
    let console = job_in_testbed(
        &image,
        "cat /etc/image-marker; ls /sbin/kiln-agent; readlink /bin/kiln-snapshot",
        Duration::from_secs(300),
    )?;
    ensure!(
        value(&console, "KILN-OUT")
            == Some("imported-from-a-tarball|/sbin/kiln-agent|/sbin/kiln-agent|"),
        "job output: {console}"
    );
    Ok(())
}

/// `kiln-gitlab`: a job whose `CI_JOB_IMAGE` names an image of
/// kiln's store, not a kernel image directory, runs its stages in a VM booted from it.
#[test]
fn image_gitlab_job_boots_a_store_image() -> Result<()> {
    use kiln_tests::gitlab_harness::{Job, HARNESS};
    let bins = kiln_tests::artifacts::static_binaries()?;
    let image = images::debian(&bins, "bookworm", &["bash", "git", "ca-certificates"], None)?;
    let job = Job::new("deb", 301).var("CI_JOB_IMAGE", &image.name).stage(
        "build_script",
        &[
            "git --version",
            "echo \"debian=$(cat /etc/debian_version) bash=${BASH_VERSION%%.*}\"",
        ],
    );
    let script = format!(
        "{}{HARNESS}{}",
        kiln_tests::shell::PRELUDE,
        r#"
gl_setup
echo "image_store = \"$FILES/store\"" >> "$KILN_GITLAB_CONFIG"
gl_job deb
# kiln run's overlay for the store image lives in a runtime dir ($TMPDIR) that must go
# with the VM.
echo "GL-RUNDIR-LEFT=$(find /tmp -name 'kiln-run-*' | wc -l)"
gl_log deb
"#
    );
    let mut files = image.files("store")?;
    files.extend(job.files());
    let started = Instant::now();
    let out = runner_for_images()?.run(&script, &files, Duration::from_secs(600))?;
    eprintln!("test-bed run took {:.1} s", started.elapsed().as_secs_f64());
    let c = &out.console;
    if let Some(line) = c.lines().find(|l| l.contains("kiln-gitlab: booted image")) {
        eprintln!("{}", line.trim());
    }
    ensure!(value(c, "GL-EXIT-deb") == Some("0"), "the job failed: {c}");
    ensure!(
        c.contains("git version 2.") && c.contains("debian=12."),
        "the build_script's output is not in the log: {c}"
    );
    ensure!(
        value(c, "GL-RUNDIR-LEFT") == Some("0"),
        "the VM's runtime directory (with the image's overlay) was left behind: {c}"
    );
    ensure!(
        c.contains(&format!("booted image \"{}\"", image.name)),
        "prepare did not say which image it booted: {c}"
    );
    Ok(())
}
