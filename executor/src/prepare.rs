//! `kiln-gitlab prepare`: one VM per job, booted from the job's image or restored from a
//! named snapshot, detached from the driver so that it outlives this call (and a SIGKILL
//! of any later one) until `cleanup` stops it. The job is who its job response says
//! (`crate::identity`); its VM gets the lowest free slot (`crate::slot`) and runs jailed
//! (`crate::launch`) unless the config says otherwise.

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
use crate::identity::Identity;
use crate::launch::{self, Launch};
use crate::slot::{keep_across_exec, Slot};
use crate::state::{JobDir, Ownership};
use crate::store;

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
    Ok(Source::Image(store::image(&sources, contract)?))
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
    job.create(&identity)?;
    let slot = Slot::claim(&config.state_dir, config.slots)?;
    let launch = launch::launch(config, &job, &source, &identity, slot.index)?;
    let store_image = match &source {
        Source::Image(image) if image.store.is_some() => Some(image.name.as_str()),
        _ => None,
    };
    job.record_launch(slot.index, store_image, launch.jail_root.as_deref())?;
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
    }
    let docker = docker(&job, contract, config.boot_timeout)?;
    let what = match &source {
        Source::Image(i) => format!("booted image {:?}", i.name),
        Source::Snapshot { name, .. } => format!("restored snapshot {name:?}"),
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
        start.elapsed().as_secs_f64()
    );
    if let Some(Report::Ready { ms, already }) = docker {
        if already {
            println!("kiln-gitlab: Docker was already running in the guest");
        } else {
            println!("kiln-gitlab: started Docker in the guest (dockerd ready in {ms} ms)");
        }
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
