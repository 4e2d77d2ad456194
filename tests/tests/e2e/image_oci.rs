//! An image made from container layers boots: a busybox root filesystem in two layers —
//! the upper one deleting a file with a whiteout and replacing another — saved the way
//! `docker save` writes it, brought into a store with `kiln image import` (the layer path
//! `kiln image pull` uses), and run as a job in the test bed, with the image config's Env
//! and WorkingDir as the job's defaults.

use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::images;
use kiln_tests::output::value;
use kiln_tests::tmp::TempDir;
use kiln_tests::Runner;

#[test]
fn image_oci_layers_boot_and_run_a_job() -> Result<()> {
    let tmp = TempDir::new("image-oci")?;
    let bins = kiln_tests::artifacts::static_binaries()?;
    let bb = kiln_tests::busybox::busybox()?;

    let lower = tmp.path().join("lower");
    std::fs::create_dir_all(lower.join("bin"))?;
    std::fs::create_dir_all(lower.join("etc"))?;
    std::fs::write(lower.join("bin/busybox"), &bb.binary)?;
    std::fs::set_permissions(
        lower.join("bin/busybox"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    for applet in &bb.applets {
        std::os::unix::fs::symlink("busybox", lower.join("bin").join(applet))?;
    }
    std::fs::write(lower.join("etc/marker"), "lower\n")?;
    std::fs::write(lower.join("etc/gone"), "deleted by the upper layer\n")?;
    let upper = tmp.path().join("upper");
    std::fs::create_dir_all(upper.join("etc"))?;
    std::fs::write(upper.join("etc/marker"), "upper\n")?;
    std::fs::write(upper.join("etc/.wh.gone"), "")?;

    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin", "IMAGE_VAR=from-the-image"], "WorkingDir": "/etc"},
    });
    let archive = tmp.path().join("image.tar");
    images::docker_save(tmp.path(), &[&lower, &upper], &config, &archive)?;
    let image = images::import(&bins, &tmp.path().join("store"), "bb-layers", &archive)?;

    let runner = match Runner::detect()? {
        Runner::Testbed(mut t) => {
            t.memory_mib = t.memory_mib.max(3072);
            Runner::Testbed(t)
        }
        direct => direct,
    };
    let script = format!(
        r#"
cat > job.sh <<'JOB'
cat /etc/marker; ls /etc/gone 2>/dev/null || echo gone; ls /sbin/kiln-agent
echo "$IMAGE_VAR in $(pwd)"
JOB
"$KILN" job --kernel "$GUEST_VMLINUX" --image {name} --store "$FILES/store" --memory 256 \
  --script job.sh > job.out 2> job.err
echo "KILN-JOB=$?"
echo "KILN-OUT=$(tr '\n' '|' < job.out)"
echo "--- job stderr"; cat job.err
"#,
        name = image.name
    );
    let out = runner.run(&script, &image.files("store")?, Duration::from_secs(300))?;
    let console = out.console;
    ensure!(
        value(&console, "KILN-JOB") == Some("0"),
        "the job failed: {console}"
    );
    ensure!(
        value(&console, "KILN-OUT") == Some("upper|gone|/sbin/kiln-agent|from-the-image in /etc|"),
        "job output: {console}"
    );
    Ok(())
}
