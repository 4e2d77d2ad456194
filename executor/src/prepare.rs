//! `kiln-gitlab prepare`: one VM per job, booted from the job's image or restored from a
//! named snapshot, detached from the driver so that it outlives this call (and a SIGKILL
//! of any later one) until `cleanup` stops it.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use kiln_agent::client::{wait_ready, Client};
use kiln_agent::protocol::AGENT_PORT;

use crate::config::Config;
use crate::contract::Contract;
use crate::state::JobDir;
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

/// Chooses the job's source: `KILN_FROM_SNAPSHOT` if set, else its image.
pub fn source(config: &Config, contract: &Contract) -> Result<Source> {
    if let Some(name) = contract.var("KILN_FROM_SNAPSHOT") {
        let scope = store::snapshot_scope(&config.snapshot_dir, contract)?;
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
    let job = JobDir::for_job(&config.state_dir, contract)?;
    // A retry (or a job id reused after a crash): whatever the last attempt left goes first.
    if job.exists() {
        if let Some(how) = job.remove()? {
            println!("kiln-gitlab: a previous attempt's VM was still there: {how}");
        }
    }
    let source = source(config, contract)?;
    job.create()?;
    let start = Instant::now();
    let mut child = spawn(config, &job, &source, contract)?;
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
    let what = match &source {
        Source::Image(i) => format!("booted image {:?}", i.name),
        Source::Snapshot { name, .. } => format!("restored snapshot {name:?}"),
    };
    println!(
        "kiln-gitlab: {what} in a kiln microVM ({} MiB, {} vCPU) in {:.1} s",
        config.memory_mib,
        config.vcpus,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Starts `kiln run` or `kiln restore` in its own session, stdio to the job's log.
fn spawn(config: &Config, job: &JobDir, source: &Source, contract: &Contract) -> Result<Child> {
    let mut cmd = Command::new(&config.kiln);
    cmd.args(kiln_args(config, job, source, contract));
    let log = std::fs::File::create(job.log())
        .with_context(|| format!("cannot create {}", job.log().display()))?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .current_dir(&job.dir);
    // SAFETY: setsid is async-signal-safe; the child leaves the driver's session and process
    // group, so the runner's signals to the driver's group never reach the VM.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("cannot start {}", config.kiln.display()))
}

/// The arguments of the job's `kiln run` or `kiln restore`.
fn kiln_args(config: &Config, job: &JobDir, source: &Source, contract: &Contract) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut arg = |a: &dyn AsRef<OsStr>| args.push(a.as_ref().to_owned());
    match source {
        Source::Image(image) => {
            arg(&"run");
            if let Some(vm) = &image.vm_config {
                arg(&"--config");
                arg(vm);
            }
            if let Some(kernel) = &image.kernel {
                arg(&"--kernel");
                arg(kernel);
            }
            if let Some(initrd) = &image.initrd {
                arg(&"--initrd");
                arg(initrd);
            }
            if let Some(store) = &image.store {
                // The store's image is the root disk; kiln gives the VM an overlay for it.
                arg(&"--image");
                arg(&image.name);
                arg(&"--store");
                arg(store);
            }
            if image.vm_config.is_none() {
                arg(&"--memory");
                arg(&config.memory_mib.to_string());
                arg(&"--vcpus");
                arg(&config.vcpus.to_string());
            }
        }
        Source::Snapshot { dir, .. } => {
            arg(&"restore");
            arg(&"--snapshot");
            arg(dir);
            if let Some(job_id) = contract.var("CI_JOB_ID") {
                arg(&"--hostname");
                arg(&format!("kiln-job-{job_id}"));
            }
        }
    }
    arg(&"--vsock");
    arg(&job.vsock());
    arg(&"--api");
    arg(&job.api());
    arg(&"--serial");
    arg(&job.console());
    if let Some(net) = &config.net {
        // A restored clone needs a TAP of its own just as a new VM does.
        arg(&"--net");
        arg(&net.replace("{id}", contract.var("CI_CONCURRENT_ID").unwrap_or("0")));
    }
    args
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
    use crate::config::{ConfigFile, Env};

    fn args(source: &Source) -> String {
        let config = Config::from_file(ConfigFile::default(), &Env::default());
        let job = JobDir { dir: "/s/j".into() };
        let contract = Contract::from_vars([("CUSTOM_ENV_CI_JOB_ID".into(), "9".into())]);
        let args = kiln_args(&config, &job, source, &contract);
        let args: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
        args.join(" ")
    }

    #[test]
    fn kiln_is_run_with_the_jobs_sockets() {
        let image = store::Image {
            name: "default".into(),
            kernel: Some("/i/kernel".into()),
            initrd: Some("/i/initrd".into()),
            vm_config: None,
            store: None,
        };
        let tail = "--vsock /s/j/vsock.sock --api /s/j/api.sock --serial /s/j/console.log";
        assert_eq!(
            args(&Source::Image(image.clone())),
            format!("run --kernel /i/kernel --initrd /i/initrd --memory 512 --vcpus 1 {tail}")
        );
        let sized = store::Image {
            kernel: None,
            initrd: None,
            vm_config: Some("/i/vm.toml".into()),
            ..image
        };
        assert_eq!(
            args(&Source::Image(sized.clone())),
            format!("run --config /i/vm.toml {tail}")
        );
        let stored = store::Image {
            name: "deb".into(),
            kernel: Some("/k".into()),
            vm_config: None,
            store: Some("/st".into()),
            ..sized
        };
        assert_eq!(
            args(&Source::Image(stored)),
            format!("run --kernel /k --image deb --store /st --memory 512 --vcpus 1 {tail}")
        );
        let snap = Source::Snapshot {
            name: "warm".into(),
            dir: "/snaps/warm".into(),
        };
        assert_eq!(
            args(&snap),
            format!("restore --snapshot /snaps/warm --hostname kiln-job-9 {tail}")
        );
    }

    #[test]
    fn each_concurrent_job_gets_its_own_tap() {
        let config = Config::from_file(
            ConfigFile {
                net: Some("tap=kiln{id},ip=10.0.{id}.2/24,gw=10.0.{id}.1".into()),
                ..ConfigFile::default()
            },
            &Env::default(),
        );
        let job = JobDir { dir: "/s/j".into() };
        let image = Source::Image(store::Image {
            name: "default".into(),
            kernel: Some("/k".into()),
            initrd: None,
            vm_config: None,
            store: None,
        });
        let snap = Source::Snapshot {
            name: "warm".into(),
            dir: "/snaps/warm".into(),
        };
        for (id, source) in [("3", &image), ("7", &snap)] {
            let contract = Contract::from_vars([("CUSTOM_ENV_CI_CONCURRENT_ID".into(), id.into())]);
            let args: Vec<String> = kiln_args(&config, &job, source, &contract)
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let net = args
                .iter()
                .position(|a| a == "--net")
                .map(|i| args[i + 1].as_str());
            let want = format!("tap=kiln{id},ip=10.0.{id}.2/24,gw=10.0.{id}.1");
            assert_eq!(net, Some(want.as_str()), "{args:?}");
        }
        // Without the variable (one job at a time), id 0.
        let args = kiln_args(&config, &job, &image, &Contract::from_vars([]));
        assert!(args
            .iter()
            .any(|a| a == "tap=kiln0,ip=10.0.0.2/24,gw=10.0.0.1"));
    }
}
