//! `gitlab_job_cold` and `gitlab_job_warm`: a whole GitLab job through `kiln-gitlab` (the
//! test harness playing the runner: config, prepare, every stage, cleanup) on a store
//! image, timed from outside, jailed as by default. Cold: `prepare` boots the image. Warm
//! (`warm_snapshots = true`): `prepare` restores the warm snapshot a first, untimed job
//! left. The stages are the same in both; the difference is the VM's start.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use kiln_tests::artifacts::StaticBinaries;
use kiln_tests::gitlab_harness::{Job, HARNESS};
use kiln_tests::tmp::TempDir;
use kiln_tests::Runner;
use serde_json::{Map, Value};

use crate::stats;
use crate::vsock::{run_script, CLOCK_SH};

pub fn run(runner: &Runner, bins: &StaticBinaries, runs: usize) -> Result<Vec<Value>> {
    let tmp = TempDir::new("bench-gitlab-job")?;
    let image = image(bins, tmp.path())?;
    let mut files = image.files("store")?;
    let job = |name: &str, id: u32| {
        Job::new(name, id)
            .var("CI_JOB_IMAGE", &image.name)
            .stage("build_script", &["true"])
    };
    files.extend(job("seed", 700).files());
    let cold: Vec<String> = (0..runs).map(|i| format!("c{i}")).collect();
    let warm: Vec<String> = (0..runs).map(|i| format!("w{i}")).collect();
    for (i, name) in cold.iter().chain(&warm).enumerate() {
        let id = 701 + u32::try_from(i).context("too many runs")?;
        files.extend(job(name, id).files());
    }
    let script = format!(
        r#"{prelude}{HARNESS}{CLOCK_SH}
gl_setup
cp -a "$FILES/store" "$GL_ROOT/store"
echo "image_store = \"$GL_ROOT/store\"" >> "$KILN_GITLAB_CONFIG"
timed() {{
  t0=$(now_us); gl_job "$2" > "gl-$2.out"; t1=$(now_us)
  grep -q "^GL-EXIT-$2=0$" "gl-$2.out" || {{ cat "gl-$2.out"; gl_log "$2"; exit 1; }}
  echo "BENCH-GL-$1 $((t1 - t0))"
}}
for j in {cold}; do timed COLD $j; gl_log $j | grep -E 'booted|restored'; done
echo "warm_snapshots = true" >> "$KILN_GITLAB_CONFIG"
gl_job seed > gl-seed.out
gl_log seed | grep -E 'booted|warm'
for j in {warm}; do timed WARM $j; gl_log $j | grep -E 'booted|restored'; done
"#,
        prelude = kiln_tests::shell::PRELUDE,
        cold = cold.join(" "),
        warm = warm.join(" "),
    );
    let timeout = Duration::from_secs(300 + 120 * 2 * runs as u64);
    let (out, clock) = run_script(runner, "gitlab_job", &script, &files, timeout)?;
    let c = &out.console;
    let ms = |tag: &str| -> Vec<f64> {
        c.lines()
            .filter_map(|l| l.trim().strip_prefix(&format!("BENCH-GL-{tag} ")))
            .filter_map(|us| us.trim().parse::<f64>().ok())
            .map(|us| us / 1000.0)
            .collect()
    };
    let (cold_ms, warm_ms) = (ms("COLD"), ms("WARM"));
    if cold_ms.len() != runs || warm_ms.len() != runs {
        bail!("expected {runs} cold and {runs} warm jobs:\n{c}");
    }
    // Every timed warm job started by restore, every cold one by a boot.
    let restored = c.matches("restored the warm snapshot").count();
    ensure!(
        restored == runs,
        "{restored} of {runs} warm jobs restored:\n{c}"
    );
    ensure!(
        c.contains("took the warm snapshot"),
        "no warm snapshot taken:\n{c}"
    );
    let mut results = Vec::new();
    for (bench, samples, what) in [
        ("gitlab_job_cold", &cold_ms, "prepare boots the store image"),
        (
            "gitlab_job_warm",
            &warm_ms,
            "prepare restores the image's warm snapshot",
        ),
    ] {
        let mut extra = Map::new();
        extra.insert(
            "what".into(),
            format!("a GitLab job through kiln-gitlab (harness, jailed, 9 stages): {what}").into(),
        );
        extra.insert(
            "guest".into(),
            "busybox + bash store image, guest vmlinux, 1 vCPU, 256 MiB".into(),
        );
        extra.insert("clock".into(), clock.clone().into());
        results.push(stats::result(
            bench,
            runner.path_name(),
            "ms",
            samples,
            extra,
        ));
    }
    Ok(results)
}

/// A store image of busybox and a static bash (what stage scripts need), imported here.
fn image(bins: &StaticBinaries, dir: &std::path::Path) -> Result<kiln_tests::images::StoreImage> {
    let bb = kiln_tests::busybox::busybox()?;
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::write(root.join("bin/busybox"), &bb.binary)?;
    std::fs::set_permissions(
        root.join("bin/busybox"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    for applet in &bb.applets {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    std::fs::copy(
        kiln_tests::guest_initramfs::BASH_STATIC,
        root.join("bin/bash"),
    )
    .context("Debian's bash-static (cargo xtask setup installs it)")?;
    let tarball = dir.join("root.tar");
    let status = std::process::Command::new("tar")
        .arg("-cf")
        .arg(&tarball)
        .arg("-C")
        .arg(&root)
        .arg(".")
        .status()
        .context("running tar")?;
    ensure!(status.success(), "tar failed");
    kiln_tests::images::import(bins, &dir.join("store"), "bench-bash", &tarball)
}
