//! `kiln-gitlab prepare`: one VM per job, booted from the job's image or restored from a
//! named snapshot, detached from the driver so that it outlives this call (and a SIGKILL
//! of any later one) until `cleanup` stops it. The job is who its job response says
//! (`crate::identity`); its VM gets the lowest free slot (`crate::slot`) and runs jailed
//! (`crate::launch`) unless the config says otherwise. A registry image is pulled first
//! (`crate::pull`); with warm snapshots on, a store image's VM is restored from its warm
//! snapshot, or snapshotted at agent-ready for the jobs after it (`crate::warm`).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use kiln_agent::client::{wait_ready, Client};
use kiln_agent::docker::Report;
use kiln_agent::protocol::AGENT_PORT;

use crate::config::Config;
use crate::contract::Contract;
use crate::defaults;
use crate::identity::Identity;
use crate::launch::{self, Launch};
use crate::pull;
use crate::slot::{keep_across_exec, Slot};
use crate::snapshot;
use crate::state::{JobDir, Ownership};
use crate::store;
use crate::warm;

/// Where the VM comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Image(store::Image),
    Snapshot {
        name: String,
        dir: std::path::PathBuf,
    },
}

/// Chooses the job's source: `KILN_FROM_SNAPSHOT` if set (from the job's own snapshot
/// scope), else its image.
pub fn source(config: &Config, contract: &Contract, identity: &Identity) -> Result<Source> {
    if let Some(name) = contract.var("KILN_FROM_SNAPSHOT") {
        let scope = store::snapshot_scope(&config.snapshot_dir, identity);
        let dir = store::existing_snapshot(&scope, name)?;
        return Ok(Source::Snapshot {
            name: name.to_string(),
            dir,
        });
    }
    let sources = store::ImageSources {
        images_dir: &config.images_dir,
        store: &config.image_store,
        store_kernel: &config.image_kernel,
        default: &config.default_image,
    };
    let pull = |reference: &str| -> Result<String> {
        let job = pull::response_policies(contract.job_response_file.as_deref())?;
        let policies =
            pull::job_policies(&config.pull_policy, &config.allowed_pull_policies, &job)?;
        let kiln = pull::KilnPull {
            kiln: &config.kiln,
            store: &config.image_store,
            insecure: &config.insecure_registries,
            auth_config: contract.var("DOCKER_AUTH_CONFIG"),
            jail_gid: config.jail.as_ref().map(|jail| jail.gid),
        };
        pull::resolve(
            &config.image_store,
            &pull::lock_dir(&config.state_dir),
            reference,
            &policies,
            &kiln,
        )
    };
    Ok(Source::Image(store::image(&sources, contract, &pull)?))
}

pub fn prepare(config: &Config, contract: &Contract) -> Result<()> {
    let identity = Identity::load(contract.job_response_file.as_deref())?;
    let job = JobDir::for_job(&config.state_dir, &identity)?;
    match job.ownership(&identity) {
        Ownership::Absent => {}
        // A retry: whatever this job's last attempt left goes first.
        Ownership::Ours => {
            if let Some(how) = job.remove()? {
                println!("kiln-gitlab: a previous attempt's VM was still there: {how}");
            }
        }
        Ownership::Foreign => bail!("{}", job.foreign(&identity)),
    }
    let source = source(config, contract, &identity)?;
    if let Some(note) = jail_copies_the_disk(config, &source) {
        println!("kiln-gitlab: note: {note}");
    }
    let image_defaults = match &source {
        Source::Image(image) if image.store.is_some() => {
            defaults::of_store_image(&config.image_store, &image.name)?
        }
        Source::Snapshot { dir, .. } => defaults::of_file(&dir.join(defaults::FILE))?,
        Source::Image(_) => None,
    };
    job.create(&identity)?;
    if let Some(d) = &image_defaults {
        defaults::write(&job.dir.join(defaults::FILE), d)?;
    }
    let slot = Slot::claim(&config.state_dir, config.slots)?;
    let warm = match &source {
        Source::Image(image) => warm::for_image(config, image, slot.index)?,
        Source::Snapshot { .. } => None,
    };
    // A warm snapshot of the image replaces the boot.
    let (source, warm_restore) = match warm
        .as_ref()
        .and_then(|w| Some((w, w.ready(&config.image_store)?)))
    {
        Some((w, dir)) => (
            Source::Snapshot {
                name: w.name.clone(),
                dir,
            },
            Some(w.image.clone()),
        ),
        None => (source, None),
    };
    let launch = launch::launch(config, &job, &source, &identity, slot.index)?;
    let store_image = match &source {
        Source::Image(image) if image.store.is_some() => Some(image.name.clone()),
        Source::Image(_) => None,
        // What the snapshot was booted from, for the snapshots this job may take in turn.
        Source::Snapshot { dir, .. } => {
            std::fs::read_to_string(dir.join(launch::SNAPSHOT_IMAGE_FILE))
                .ok()
                .map(|n| n.trim().to_string())
        }
    };
    job.record_launch(
        slot.index,
        store_image.as_deref(),
        launch.jail_root.as_deref(),
    )?;
    let start = Instant::now();
    let mut child = spawn(config, &job, &launch, &slot)?;
    drop(slot); // the VM's kiln holds the slot from here on
    job.write_pid(i32::try_from(child.id()).context("pid out of range")?)?;
    match wait_agent(&mut child, &job, config.boot_timeout) {
        Ok(()) => {}
        Err(e) => {
            job.stop_vm();
            let log = job.log_tail(2000);
            let log = if log.trim().is_empty() {
                "kiln's log is empty".to_string()
            } else {
                format!("kiln's log ends:\n{}", log.trim_end())
            };
            return Err(anyhow::anyhow!("{e:#}; {log}"));
        }
    }
    if matches!(source, Source::Image(_)) {
        // A fresh guest's clock starts at the RTC-less epoch; give it the host's time and
        // some entropy (a restore does this itself).
        refresh(&job).context("setting the new guest's clock")?;
        if let Some((uid, gid)) = image_defaults.as_ref().and_then(|d| d.non_root()) {
            make_job_dirs(config, &job, uid, gid);
        }
    }
    let ready_in = start.elapsed();
    // Before the warm snapshot, so that jobs restored from it find Docker running.
    let docker = docker(&job, contract, config.boot_timeout)?;
    let what = match (&source, &warm_restore) {
        (Source::Image(i), _) => format!("booted image {:?}", i.name),
        (Source::Snapshot { .. }, Some(image)) => {
            format!("restored the warm snapshot of image {image:?}")
        }
        (Source::Snapshot { name, .. }, None) => format!("restored snapshot {name:?}"),
    };
    let how = if launch.jail_root.is_some() {
        "jailed"
    } else {
        "unjailed"
    };
    println!(
        "kiln-gitlab: {what} in a kiln microVM ({} MiB, {} vCPU, slot {}, {how}) in {:.1} s",
        config.memory_mib,
        config.vcpus,
        job.slot().map_or("?".to_string(), |s| s.to_string()),
        ready_in.as_secs_f64()
    );
    if let Some(Report::Ready { ms, already }) = docker {
        if already {
            println!("kiln-gitlab: Docker was already running in the guest");
        } else {
            println!("kiln-gitlab: started Docker in the guest (dockerd ready in {ms} ms)");
        }
    }
    if let (Source::Image(image), Some(w)) = (&source, &warm) {
        take_warm(config, &job, &identity, image, w);
    }
    Ok(())
}

/// What the job's `KILN_DOCKER` variable asks of Docker in its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DockerWish {
    /// Unset: start dockerd when the image has it.
    IfInstalled,
    /// "1", "true", "yes": start it, and fail the job if the image has none.
    Required,
    /// "0", "false", "no": leave it.
    Never,
}

impl DockerWish {
    /// Reads `KILN_DOCKER`; a value that is neither yes nor no is an error naming it.
    pub fn from_contract(contract: &Contract) -> Result<DockerWish> {
        match contract
            .var("KILN_DOCKER")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None => Ok(DockerWish::IfInstalled),
            Some("1" | "true" | "yes") => Ok(DockerWish::Required),
            Some("0" | "false" | "no") => Ok(DockerWish::Never),
            Some(other) => bail!("KILN_DOCKER: {other:?} is neither 1/true/yes nor 0/false/no"),
        }
    }
}

/// Before the job's first stage, the agent starts Docker as `KILN_DOCKER` asks (a job whose
/// image has Docker gets it by default), waiting at most `timeout` for it to answer.
fn docker(job: &JobDir, contract: &Contract, timeout: Duration) -> Result<Option<Report>> {
    let if_installed = match DockerWish::from_contract(contract)? {
        DockerWish::Never => return Ok(None),
        DockerWish::IfInstalled => true,
        DockerWish::Required => false,
    };
    let mut client = Client::connect_with_timeout(
        &job.vsock(),
        AGENT_PORT,
        Some(timeout + Duration::from_secs(10)),
    )?;
    kiln_agent::docker::request(&mut client, if_installed, timeout)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("Docker in the job's VM: {e}"))
}

/// A store image's disk is linked into a jail only from the jails' filesystem; from another
/// one, each jail gets a copy: slow for a large disk, and a snapshot's disk (checked by its
/// modification time) never matches the next jail's copy. Says so, if that is the case.
fn jail_copies_the_disk(config: &Config, source: &Source) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let jail = config.jail.as_ref()?;
    let image = match source {
        Source::Image(image) if image.store.is_some() => image.name.clone(),
        Source::Snapshot { dir, .. } => {
            let name = std::fs::read_to_string(dir.join(launch::SNAPSHOT_IMAGE_FILE)).ok()?;
            name.trim().to_string()
        }
        Source::Image(_) => return None,
    };
    let disk = config.image_store.join(&image).join("rootfs.ext4");
    let disk_dev = std::fs::metadata(&disk).ok()?.dev();
    // The base, or the nearest of its parents that exists yet.
    let base_dev = jail
        .base
        .ancestors()
        .find_map(|dir| std::fs::metadata(dir).ok())?
        .dev();
    (disk_dev != base_dev).then(|| {
        format!(
            "the image store {} is not on the filesystem of jail_base {}: every jail gets \
             its own copy of image {image:?}, and snapshots of VMs booted from it cannot be \
             restored; put both on one filesystem",
            config.image_store.display(),
            jail.base.display()
        )
    })
}

/// Starts kiln in its own session, stdio to the job's log, holding the slot's lock.
fn spawn(config: &Config, job: &JobDir, launch: &Launch, slot: &Slot) -> Result<Child> {
    let mut cmd = Command::new(&config.kiln);
    cmd.args(&launch.args);
    let log = std::fs::File::create(job.log())
        .with_context(|| format!("cannot create {}", job.log().display()))?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .current_dir(&job.dir);
    let slot_fd = slot.fd();
    // SAFETY: setsid and fcntl are async-signal-safe; the child leaves the driver's session
    // and process group, so the runner's signals to the driver's group never reach the VM,
    // and it keeps the slot's lock open for as long as it runs.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            keep_across_exec(slot_fd)
        });
    }
    cmd.spawn()
        .with_context(|| format!("cannot start {}", config.kiln.display()))
}

/// Waits until the guest agent answers, or fails early if kiln exits.
fn wait_agent(child: &mut Child, job: &JobDir, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            // kiln says why on its stderr, which went to the job's log: quote its end.
            let log = std::fs::read_to_string(job.log()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let said = lines[lines.len().saturating_sub(5)..].join("\n");
            bail!(
                "the VM did not start: kiln exited ({status}) before the guest agent answered; \
                 it said:\n{said}"
            );
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("the guest agent did not answer within {timeout:?}");
        }
        if wait_ready(
            job.vsock(),
            AGENT_PORT,
            left.min(Duration::from_millis(500)),
        )
        .is_ok()
        {
            return Ok(());
        }
    }
}

fn refresh(job: &JobDir) -> Result<()> {
    let mut client =
        Client::connect_with_timeout(&job.vsock(), AGENT_PORT, Some(Duration::from_secs(10)))?;
    client.set_time(SystemTime::now())?;
    let mut entropy = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut entropy)?;
    client.add_entropy(&entropy)?;
    Ok(())
}

/// The builds and cache directories, owned by the image's user that stages run as (they
/// run as root otherwise, who needs none made). Only reported if it fails: the image may
/// lack `mkdir` or `chown`, and the job's own stages then say what they cannot write.
fn make_job_dirs(config: &Config, job: &JobDir, uid: u32, gid: u32) {
    let dirs = [config.builds_dir.as_str(), config.cache_dir.as_str()];
    let ids = format!("{uid}:{gid}");
    let made =
        Client::connect_with_timeout(&job.vsock(), AGENT_PORT, Some(Duration::from_secs(10)))
            .map_err(anyhow::Error::from)
            .and_then(|mut client| {
                for argv in [
                    ["mkdir", "-p", dirs[0], dirs[1]],
                    ["chown", ids.as_str(), dirs[0], dirs[1]],
                ] {
                    let req = kiln_agent::protocol::ExecRequest::new(argv);
                    let (mut out, mut err) = (Vec::new(), Vec::new());
                    let status = client.exec(&req, &mut out, &mut err)?;
                    if status.shell_code() != 0 {
                        bail!(
                            "{}: {}",
                            argv.join(" "),
                            String::from_utf8_lossy(&err).trim()
                        );
                    }
                }
                Ok(())
            });
    if let Err(e) = made {
        println!(
            "kiln-gitlab: note: could not give {} and {} to the image's user {ids}: {e:#}",
            dirs[0], dirs[1]
        );
    }
}

/// Snapshots the freshly booted VM as the warm snapshot of its image, and prunes the others.
/// A failure is reported only: the job itself has its VM.
fn take_warm(
    config: &Config,
    job: &JobDir,
    identity: &Identity,
    image: &store::Image,
    w: &warm::Warm,
) {
    let gid = config.jail.as_ref().map_or(0, |jail| jail.gid);
    let tag = format!("warm-job-{}", identity.job_id);
    let taken = snapshot::take(job, &w.scope, &w.name, &tag, gid).and_then(|(_, took)| {
        w.record()?;
        Ok(took)
    });
    match taken {
        Ok(took) => {
            println!(
                "kiln-gitlab: took the warm snapshot {} of image {:?} at agent-ready in {:.1} s; \
                 later jobs on it start by restore",
                w.name,
                image.name,
                took.as_secs_f64()
            );
            let removed = warm::prune(w, config.warm_limits);
            if !removed.is_empty() {
                println!(
                    "kiln-gitlab: removed warm snapshots {} (replaced, unused or over the size limit)",
                    removed.join(", ")
                );
            }
        }
        Err(e) => println!(
            "kiln-gitlab: note: no warm snapshot of image {:?}: {e:#}",
            image.name
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wish(value: Option<&str>) -> Result<DockerWish> {
        let vars = value.map(|v| ("CUSTOM_ENV_KILN_DOCKER".to_string(), v.to_string()));
        DockerWish::from_contract(&Contract::from_vars(vars))
    }

    #[test]
    fn kiln_docker_asks_for_docker_or_not() {
        assert_eq!(wish(None).unwrap(), DockerWish::IfInstalled);
        assert_eq!(wish(Some("")).unwrap(), DockerWish::IfInstalled);
        for v in ["1", "true", "YES"] {
            assert_eq!(wish(Some(v)).unwrap(), DockerWish::Required, "{v}");
        }
        for v in ["0", "false", "no"] {
            assert_eq!(wish(Some(v)).unwrap(), DockerWish::Never, "{v}");
        }
        let err = wish(Some("maybe")).unwrap_err().to_string();
        assert!(err.contains("KILN_DOCKER"), "{err}");
    }
}
