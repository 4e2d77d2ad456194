//! `kiln-gitlab run <script> <stage>`: one stage's script through the guest agent.
//!
//! The script goes to the guest's `bash` on stdin (as GitLab's own Docker executor does; the
//! runner's bash scripts run their commands as `: | eval …`, so commands do not read it),
//! so no job script with the job's variables is ever written to the guest's disk. Output
//! streams to the job log as it comes; the script's exit code maps to the contract's.

use std::io::{Cursor, Write};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use kiln_agent::client::{connect_ready, Client, ClientError, ExecIo};
use kiln_agent::protocol::{ExecRequest, SignalTarget, StdinMode, AGENT_PORT};

use crate::config::Config;
use crate::contract::{Contract, Failure};
use crate::defaults;
use crate::identity::Identity;
use crate::snapshot;
use crate::state::JobDir;
use crate::store;

/// How long `run` tries to reach the agent of a VM that is running.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// After SIGKILL, how long the stage's processes get to go before the driver exits anyway.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// Stages after which `KILN_KEEP_FAILED` keeps a snapshot of a failed job.
pub fn is_user_script(stage: &str) -> bool {
    stage == "build_script" || stage.starts_with("step_")
}

pub fn run(
    config: &Config,
    contract: &Contract,
    script_path: &std::path::Path,
    stage: &str,
) -> Result<(), Failure> {
    let identity = Identity::load(contract.job_response_file.as_deref())?;
    let job = JobDir::for_job(&config.state_dir, &identity)?;
    job.check_owner(&identity)?;
    let script = std::fs::read(script_path)
        .with_context(|| format!("cannot read the stage script {}", script_path.display()))?;
    if job.running_vm().is_none() {
        let log = job.log_tail(1500);
        return Err(Failure::System(anyhow!(
            "the job's VM is not running (did prepare succeed?); kiln's log ends:\n{}",
            log.trim_end()
        )));
    }
    let mut client = connect_ready(job.vsock(), AGENT_PORT, CONNECT_TIMEOUT)
        .context("cannot reach the guest agent")?;

    let cancel = Cancel::install(&job, config.kill_grace)?;
    let mut request = ExecRequest::new([config.shell.as_str()]);
    request.stdin = StdinMode::Pipe;
    if let Some(d) = defaults::of_file(&job.dir.join(defaults::FILE))? {
        d.apply(&mut request);
    }
    let mut stdin = Cursor::new(script);
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let exec_id = cancel.exec_id.clone();
    let signalled = cancel.signal.clone();
    let vsock = job.vsock();
    let mut on_started = move |started: kiln_agent::protocol::Started| {
        *exec_id.lock().unwrap_or_else(|e| e.into_inner()) = Some(started.exec_id);
        // A cancel that came before the exec started.
        if signalled.load(Ordering::SeqCst) != 0 {
            signal_guest(&vsock, started.exec_id, libc::SIGTERM);
        }
    };
    let result = client.exec_with(
        &request,
        ExecIo {
            stdin: Some(&mut stdin),
            stdout: &mut out,
            stderr: &mut err,
            on_started: Some(&mut on_started),
        },
    );
    let _ = cancel.done.send(());
    let signo = cancel.signal.load(Ordering::SeqCst);
    if signo != 0 {
        eprintln!("kiln-gitlab: stage {stage} cancelled (signal {signo})");
        return Err(Failure::Cancelled(signo));
    }
    let status = match result {
        Ok(status) => status,
        Err(ClientError::Remote(message))
            if message.starts_with(&format!("{}: command not found", config.shell)) =>
        {
            return Err(missing_shell(config, contract, stage, &message));
        }
        Err(e) => {
            return Err(anyhow!(e)
                .context(format!(
                    "the guest agent stopped answering during stage {stage}"
                ))
                .into())
        }
    };
    let code = status.shell_code();
    if code == 0 {
        if contract.var("KILN_SNAPSHOT_AFTER") == Some(stage) {
            snapshot_after(config, contract, &identity, &job, stage)?;
        }
        return Ok(());
    }
    if is_user_script(stage) && contract.flag("KILN_KEEP_FAILED") {
        keep_failed(config, contract, &identity, &job, stage);
    }
    if let Some(file) = &contract.build_exit_code_file {
        std::fs::write(file, format!("{code}\n"))
            .with_context(|| format!("cannot write the exit code to {}", file.display()))?;
    }
    Err(Failure::Build(code))
}

/// The image has no shell to run the stage's script with: a failure of the job's choice of
/// image (a build failure, code 127 as a shell's for a missing command), said in the job log.
fn missing_shell(config: &Config, contract: &Contract, stage: &str, message: &str) -> Failure {
    let image = contract.var("CI_JOB_IMAGE").unwrap_or("the job's image");
    eprintln!(
        "kiln-gitlab: the image {image} has no `{shell}` ({message}): kiln-gitlab runs every \
         stage's script ({stage} first) with {shell}; use an image that has {shell}, or add it \
         to this one",
        shell = config.shell
    );
    if let Some(file) = &contract.build_exit_code_file {
        let _ = std::fs::write(file, "127\n");
    }
    Failure::Build(127)
}

/// The group a jailed VM's snapshot is made readable by (unused when not jailed).
fn jail_gid(config: &Config) -> u32 {
    config.jail.as_ref().map_or(0, |jail| jail.gid)
}

/// `KILN_SNAPSHOT_AFTER=<stage>` + `KILN_SNAPSHOT_NAME=<name>`.
fn snapshot_after(
    config: &Config,
    contract: &Contract,
    identity: &Identity,
    job: &JobDir,
    stage: &str,
) -> anyhow::Result<()> {
    let name = contract
        .var("KILN_SNAPSHOT_NAME")
        .context("KILN_SNAPSHOT_AFTER is set but KILN_SNAPSHOT_NAME is not")?;
    store::check_name("KILN_SNAPSHOT_NAME", name)?;
    let scope = store::snapshot_scope(&config.snapshot_dir, identity);
    let (dir, took) = snapshot::take(job, &scope, name, &tag(identity), jail_gid(config))?;
    println!(
        "kiln-gitlab: snapshot {name:?} taken after {stage} in {:.1} s ({}); jobs with \
         KILN_FROM_SNAPSHOT={name} start from it",
        took.as_secs_f64(),
        dir.display()
    );
    Ok(())
}

/// `KILN_KEEP_FAILED=1`: snapshot the failed job and print how to reopen it. A failure here
/// is only reported: the job has failed already.
fn keep_failed(
    config: &Config,
    contract: &Contract,
    identity: &Identity,
    job: &JobDir,
    stage: &str,
) {
    let scope = store::snapshot_scope(&config.snapshot_dir, identity);
    let name = format!("failed-job-{}", identity.job_id);
    let result = snapshot::take(job, &scope, &name, &tag(identity), jail_gid(config));
    match result {
        Ok((dir, _)) => {
            let base = format!("/tmp/kiln-debug-{}", identity.job_id);
            let project = contract.var("CI_PROJECT_DIR").unwrap_or(&config.builds_dir);
            println!(
                "kiln-gitlab: {stage} failed; kept a snapshot of the job's VM in {dir}\n\
                 kiln-gitlab: to reopen it on this runner's host:\n  \
                 {kiln} restore --snapshot {dir} --vsock {base}.vsock --api {base}.api --serial null &\n  \
                 {kiln} shell --vsock {base}.vsock --cwd {project}\n  \
                 {kiln} ctl --api {base}.api shutdown\n\
                 kiln-gitlab: remove the snapshot with: rm -r {dir}",
                dir = dir.display(),
                kiln = config.kiln.display(),
            );
        }
        Err(e) => println!("kiln-gitlab: could not keep a snapshot of the failed job: {e:#}"),
    }
}

/// Unique among the jobs that may snapshot into one scope at once.
fn tag(identity: &Identity) -> String {
    format!("job-{}", identity.job_id)
}

/// Sends `signo` to an exec's process group, on a connection of its own.
fn signal_guest(vsock: &std::path::Path, exec_id: u64, signo: i32) {
    let sent = Client::connect_with_timeout(vsock, AGENT_PORT, Some(Duration::from_secs(3)))
        .and_then(|mut c| c.signal(SignalTarget::Exec(exec_id), signo));
    if let Err(e) = sent {
        eprintln!("kiln-gitlab: could not signal the stage's processes: {e}");
    }
}

/// SIGTERM/SIGINT from the runner: the stage's process group in the guest gets SIGTERM,
/// then SIGKILL after the grace period; the driver exits if the stage has still not ended.
struct Cancel {
    exec_id: Arc<Mutex<Option<u64>>>,
    signal: Arc<AtomicI32>,
    done: std::sync::mpsc::Sender<()>,
}

impl Cancel {
    fn install(job: &JobDir, grace: Duration) -> anyhow::Result<Cancel> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .context("cannot install the signal handlers")?;
        let exec_id = Arc::new(Mutex::new(None));
        let signal = Arc::new(AtomicI32::new(0));
        let (done, finished) = channel::<()>();
        let (ids, flag, vsock) = (exec_id.clone(), signal.clone(), job.vsock());
        std::thread::Builder::new()
            .name("kiln-gitlab-cancel".into())
            .spawn(move || {
                let Some(signo) = signals.forever().next() else {
                    return;
                };
                flag.store(signo, Ordering::SeqCst);
                let id = *ids.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(id) = id {
                    signal_guest(&vsock, id, libc::SIGTERM);
                }
                if !matches!(finished.recv_timeout(grace), Err(RecvTimeoutError::Timeout)) {
                    return;
                }
                let id = *ids.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(id) = id {
                    signal_guest(&vsock, id, libc::SIGKILL);
                }
                if !matches!(
                    finished.recv_timeout(KILL_WAIT),
                    Err(RecvTimeoutError::Timeout)
                ) {
                    return;
                }
                eprintln!(
                    "kiln-gitlab: the stage did not end after SIGKILL; leaving it to cleanup"
                );
                let _ = std::io::stdout().flush();
                std::process::exit(128 + signo);
            })
            .context("cannot start the cancel thread")?;
        Ok(Cancel {
            exec_id,
            signal,
            done,
        })
    }
}
