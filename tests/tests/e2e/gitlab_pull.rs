//! `kiln-gitlab` with jobs whose `image:` is a registry reference: the driver pulls it into
//! kiln's image store with the job's pull policy and credentials, boots it, and runs every
//! stage with the image's Env, WorkingDir and User. A registry (Debian's `docker-registry`)
//! serves the test's images on the test bed's loopback, from a storage filled here.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln_tests::gitlab_harness::{Job, HARNESS};
use kiln_tests::output::value;
use kiln_tests::registry::{self, Registry};
use kiln_tests::tmp::TempDir;
use kiln_tests::Runner;

/// The image's user, in its own /etc/passwd.
const UID: u32 = 1000;

/// The layers: a busybox root with a user (root's), that user's home and working
/// directory (the user's), and bash (root's). The second image lacks bash.
fn layers(tmp: &Path) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let bb = kiln_tests::busybox::busybox()?;
    let base = tmp.join("base");
    std::fs::create_dir_all(base.join("bin"))?;
    std::fs::create_dir_all(base.join("etc"))?;
    std::fs::create_dir_all(base.join("tmp"))?;
    std::fs::write(base.join("bin/busybox"), &bb.binary)?;
    std::fs::set_permissions(
        base.join("bin/busybox"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    for applet in &bb.applets {
        std::os::unix::fs::symlink("busybox", base.join("bin").join(applet))?;
    }
    std::fs::write(
        base.join("etc/passwd"),
        format!("root:x:0:0:root:/root:/bin/sh\nbuilder:x:{UID}:{UID}::/home/builder:/bin/sh\n"),
    )?;
    std::fs::write(
        base.join("etc/group"),
        format!("root:x:0:\nbuilder:x:{UID}:\n"),
    )?;
    let user = tmp.join("user");
    std::fs::create_dir_all(user.join("home/builder"))?;
    std::fs::create_dir_all(user.join("work"))?;
    let bash = tmp.join("bash");
    std::fs::create_dir_all(bash.join("bin"))?;
    std::fs::copy(
        kiln_tests::guest_initramfs::BASH_STATIC,
        bash.join("bin/bash"),
    )
    .context("Debian's bash-static (cargo xtask setup installs it)")?;
    Ok((
        registry::layer(&base, 0, 0)?,
        registry::layer(&user, UID, UID)?,
        registry::layer(&bash, 0, 0)?,
    ))
}

/// Job a pulls and runs in the image as its user, and leaves a warm snapshot; job b
/// (if-not-present) uses the store's copy and starts from that snapshot, sooner; a job on
/// a tag the registry lacks fails in prepare with the registry's answer;
/// a job on the image without bash fails naming it; an authenticated registry takes the
/// job's DOCKER_AUTH_CONFIG and refuses a job without it.
#[test]
fn gitlab_job_pulls_its_image_and_runs_with_its_defaults() -> Result<()> {
    let tmp = TempDir::new("gitlab-pull")?;
    let bins = kiln_tests::artifacts::static_binaries()?;
    let (base, user, bash) = layers(tmp.path())?;
    let reg_dir = tmp.path().join("registry");
    std::fs::create_dir_all(&reg_dir)?;
    let registry = Registry::start(&reg_dir)?;
    let defaults = serde_json::json!({
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "IMAGE_GREETING=from-the-image",
                "OVERRIDDEN=by-the-image"],
        "WorkingDir": "/work",
        "User": "builder",
    });
    let digest = registry.push(
        "tools/bash",
        "1",
        &[base.clone(), user.clone(), bash],
        defaults.clone(),
    )?;
    registry.push("tools/nobash", "1", &[base, user], defaults)?;
    let mut files = registry.into_files("registry")?;
    files.extend(kiln_tests::host_tools::program_files(
        Path::new(registry::PROGRAM),
        "/bin/docker-registry",
        "hostroot",
    )?);
    files.extend(kiln_tests::host_tools::program_files(
        Path::new("/sbin/mke2fs"),
        "/sbin/mkfs.ext4",
        "hostroot",
    )?);
    files.push((
        "hostroot/etc/mke2fs.conf".into(),
        std::fs::read("/etc/mke2fs.conf")?,
    ));
    // kiln's registry client wants the system's CA certificates even for plain HTTP.
    let certs = "/etc/ssl/certs/ca-certificates.crt";
    files.push((
        format!("hostroot{certs}"),
        std::fs::read(certs).context("Debian's ca-certificates")?,
    ));
    files.push(("kiln-agent".into(), std::fs::read(&bins.kiln_agent)?));
    let htpasswd = std::process::Command::new("htpasswd")
        .args(["-Bbn", "ci", "s3cret"])
        .output()
        .context("htpasswd (apache2-utils)")?;
    ensure!(htpasswd.status.success(), "htpasswd failed");
    files.push(("htpasswd".into(), htpasswd.stdout));

    let open = "127.0.0.1:5000/tools/bash:1";
    let closed = "127.0.0.1:5001/tools/bash:1";
    let auth = r#"{"auths": {"127.0.0.1:5001": {"username": "ci", "password": "s3cret"}}}"#;
    let jobs = [
        Job::new("a", 501)
            .var("CI_JOB_IMAGE", open)
            .var("OVERRIDDEN", "by-the-job")
            .stage("prepare_script", &["echo \"start-dir=$(pwd)\""])
            .stage(
                "build_script",
                &[
                    "echo \"as uid=$(id -u):$(id -g) home=$HOME greeting=$IMAGE_GREETING \
                   overridden=$OVERRIDDEN\"",
                    "touch \"$HOME/written\" && echo home-writable",
                ],
            ),
        Job::new("b", 502)
            .var("CI_JOB_IMAGE", open)
            .pull_policy(&["if-not-present"])
            .stage("build_script", &["echo \"b-runs-as=$(id -u)\""]),
        Job::new("nope", 503).var("CI_JOB_IMAGE", "127.0.0.1:5000/tools/bash:nope"),
        Job::new("nobash", 504).var("CI_JOB_IMAGE", "127.0.0.1:5000/tools/nobash:1"),
        Job::new("noauth", 505).var("CI_JOB_IMAGE", closed),
        Job::new("auth", 506)
            .var("CI_JOB_IMAGE", closed)
            .var("DOCKER_AUTH_CONFIG", auth)
            .stage("build_script", &["echo \"auth-runs-as=$(id -u)\""]),
    ];
    for job in &jobs {
        files.extend(job.files());
    }
    let script = format!(
        "{}{HARNESS}{}",
        kiln_tests::shell::PRELUDE,
        r#"
cp -a "$FILES/hostroot/." /
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
reg() {
  cat > "reg-$1.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $FILES/registry
http:
  addr: 127.0.0.1:$1
$2
EOF
  /bin/docker-registry serve "reg-$1.yml" > "reg-$1.log" 2>&1 &
  n=0
  # Up when /v2/ answers: 200, or 401 where it asks for a login.
  until wget -q -O /dev/null "http://127.0.0.1:$1/v2/" 2> "reg-$1.wget" || grep -q 401 "reg-$1.wget"; do
    n=$((n + 1)); [ $n -lt 600 ] || { echo "REG-$1=down"; cat "reg-$1.log"; return 1; }; sleep 0.1
  done
  echo "REG-$1=up"
}
reg 5000 ""
reg 5001 "auth:
  htpasswd:
    realm: kiln-test
    path: $FILES/htpasswd"
gl_setup
mkdir -p -m 700 "$GL_ROOT/store"
cat >> "$KILN_GITLAB_CONFIG" <<EOF
image_store = "$GL_ROOT/store"
insecure_registries = ["127.0.0.1:5000", "127.0.0.1:5001"]
allowed_pull_policies = ["always", "if-not-present"]
warm_snapshots = true
EOF
export KILN_AGENT="$FILES/kiln-agent"
for j in a b nope nobash noauth auth; do gl_job $j; done
echo "GL-STORE=$(ls "$GL_ROOT/store" | tr '\n' ' ')"
for j in a b nope nobash noauth auth; do gl_log $j; done
"#
    );
    let runner = match Runner::detect()? {
        Runner::Testbed(mut t) => {
            t.memory_mib = t.memory_mib.max(3072);
            Runner::Testbed(t)
        }
        direct => direct,
    };
    let out = runner.run(&script, &files, Duration::from_secs(900))?;
    let c = &out.console;
    eprintln!("{c}"); // shown with --nocapture
    let log = |job: &str| -> String {
        let start = format!("GL-LOG={job}\n");
        let Some(at) = c.find(&start) else {
            return String::new();
        };
        let rest = &c[at + start.len()..];
        rest[..rest.find("GL-LOG=").unwrap_or(rest.len())].to_string()
    };
    ensure!(value(c, "REG-5000") == Some("up"), "registry: {c}");

    ensure!(value(c, "GL-EXIT-a") == Some("0"), "job a: {c}");
    let a = log("a");
    ensure!(
        a.contains(&format!("pulled {open} ({digest}, fetched)")),
        "job a's log does not say it pulled {digest}: {a}"
    );
    ensure!(a.contains("start-dir=/work"), "WorkingDir: {a}");
    ensure!(
        a.contains(&format!(
            "as uid={UID}:{UID} home=/home/builder greeting=from-the-image overridden=by-the-job"
        )),
        "the image's defaults: {a}"
    );
    ensure!(a.contains("home-writable"), "{a}");

    ensure!(a.contains("took the warm snapshot"), "{a}");
    ensure!(value(c, "GL-EXIT-b") == Some("0"), "job b: {c}");
    let b = log("b");
    ensure!(!b.contains("pulled"), "if-not-present pulled again: {b}");
    ensure!(b.contains(&format!("b-runs-as={UID}")), "{b}");
    // Job b starts from the warm snapshot job a took, and is ready sooner.
    let booted = ready_secs(&a, "booted image")?;
    let restored = ready_secs(&b, "restored the warm snapshot of image")?;
    eprintln!("gitlab_pull: ready in {booted:.1} s booted, {restored:.1} s restored");
    ensure!(
        restored < booted,
        "the warm restore ({restored} s) is not faster than the boot ({booted} s)"
    );

    ensure!(
        value(c, "GL-PREPARE-nope") == Some("72 3"),
        "an unknown tag is a system failure: {c}"
    );
    let nope = log("nope");
    ensure!(
        nope.contains("cannot get image \"127.0.0.1:5000/tools/bash:nope\"")
            && nope.to_lowercase().contains("manifest unknown"),
        "the failure does not say what the registry answered: {nope}"
    );

    ensure!(value(c, "GL-EXIT-nobash") == Some("71"), "{c}");
    ensure!(value(c, "GL-EXITFILE-nobash") == Some("127"), "{c}");
    let nobash = log("nobash");
    ensure!(nobash.contains("has no `bash`"), "{nobash}");

    ensure!(value(c, "GL-PREPARE-noauth") == Some("72 3"), "{c}");
    let noauth = log("noauth");
    ensure!(
        noauth.contains("no credentials for 127.0.0.1:5001"),
        "{noauth}"
    );
    ensure!(value(c, "GL-EXIT-auth") == Some("0"), "job auth: {c}");
    let auth_log = log("auth");
    ensure!(
        auth_log.contains("the store had it") && auth_log.contains(&format!("auth-runs-as={UID}")),
        "{auth_log}"
    );
    // The same disk under another reference: the same warm snapshot.
    ensure!(
        auth_log.contains("restored the warm snapshot"),
        "{auth_log}"
    );
    // One image per reference pulled; nothing of the failed pulls.
    let store = value(c, "GL-STORE").unwrap_or("");
    ensure!(
        store.split_whitespace().count() == 3,
        "the store should hold bash:1 from each registry and nobash:1: {store}"
    );
    Ok(())
}

/// The seconds of the driver's "… in a kiln microVM (…) in N s" line that starts with `what`.
fn ready_secs(log: &str, what: &str) -> Result<f64> {
    let line = log
        .lines()
        .find(|l| l.contains(what) && l.contains("kiln microVM"))
        .with_context(|| format!("no {what:?} line in: {log}"))?;
    line.trim_end()
        .strip_suffix(" s")
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no seconds in {line:?}"))
}
