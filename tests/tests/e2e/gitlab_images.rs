//! `kiln-gitlab` with root-disk images of kiln's store, jailed (the default): a snapshot of
//! a VM booted from a store image names the image's disk by its path inside the jail
//! (`/images/<name>/rootfs.ext4`), so a jailed restore must be given that image again, and
//! the very same file (linked from the store, which must be on the jails' filesystem).

use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::gitlab_harness::{Job, HARNESS};
use kiln_tests::output::value;
use kiln_tests::Runner;

/// Job W boots the Debian store image, writes a file and snapshots after get_sources;
/// job R restores that snapshot in a jail of its own and finds the file on the root disk.
#[test]
fn gitlab_store_image_snapshot_restores_jailed() -> Result<()> {
    let bins = kiln_tests::artifacts::static_binaries()?;
    let image =
        kiln_tests::images::debian(&bins, "bookworm", &["bash", "git", "ca-certificates"], None)?;
    let jobs = [
        Job::new("w", 401)
            .var("CI_JOB_IMAGE", &image.name)
            .var("KILN_SNAPSHOT_AFTER", "get_sources")
            .var("KILN_SNAPSHOT_NAME", "deb-warm")
            .stage(
                "get_sources",
                &["echo written-before-the-snapshot > /var/tmp/mark", "sync"],
            ),
        Job::new("r", 402)
            .var("KILN_FROM_SNAPSHOT", "deb-warm")
            .stage(
            "build_script",
            &["echo \"restored-sees: $(cat /var/tmp/mark) debian=$(cat /etc/debian_version)\""],
        ),
    ];
    let script = format!(
        "{}{HARNESS}{}",
        kiln_tests::shell::PRELUDE,
        r#"
gl_setup
# The store on the jails' filesystem: a jail then links the image in rather than copying it
# (a copy is a new file, which a snapshot's disk no longer matches).
cp -a "$FILES/store" "$GL_ROOT/store"
echo "image_store = \"$GL_ROOT/store\"" >> "$KILN_GITLAB_CONFIG"
gl_job w
echo "GL-SIDECAR=$(cat snaps/project-7/unprotected/deb-warm/kiln-gitlab-image)"
gl_job r
echo "GL-JAILS-LEFT=$(find jails -mindepth 1 ! -path 'jails/.uids*' | wc -l)"
gl_log w
gl_log r
"#
    );
    let mut files = image.files("store")?;
    for job in &jobs {
        files.extend(job.files());
    }
    let runner = match Runner::detect()? {
        Runner::Testbed(mut t) => {
            t.memory_mib = t.memory_mib.max(3072);
            Runner::Testbed(t)
        }
        direct => direct,
    };
    let out = runner.run(&script, &files, Duration::from_secs(600))?;
    let c = &out.console;
    eprintln!("{c}"); // shown with --nocapture
    ensure!(value(c, "GL-EXIT-w") == Some("0"), "job w: {c}");
    ensure!(
        value(c, "GL-SIDECAR") == Some(image.name.as_str()),
        "the snapshot does not name its store image: {c}"
    );
    ensure!(value(c, "GL-EXIT-r") == Some("0"), "job r: {c}");
    ensure!(
        c.contains("restored-sees: written-before-the-snapshot debian=12."),
        "the restored VM does not see the snapshot's disk: {c}"
    );
    ensure!(value(c, "GL-JAILS-LEFT") == Some("0"), "{c}");
    Ok(())
}
