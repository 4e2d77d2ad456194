//! `kiln job`: one CI job in one fresh VM.
//!
//! The VM runs on its own thread; this thread waits for the guest agent's boot-done mark,
//! copies the script in, runs it with output streamed live, then stops the VM and removes
//! its files. A signal thread turns SIGINT/SIGTERM into a cancel: the job's process group
//! gets SIGTERM, then SIGKILL, and the VM is stopped whether or not the guest answers.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kiln_agent::client::{Client, ClientError};
use kiln_agent::protocol::{ExecRequest, SignalTarget, AGENT_PORT};

mod work;

use super::common::{
    check_files, check_snapshot_dir, connect_agent, console_sink, exec_streamed, parse_env,
    seccomp_filters, RuntimeDir,
};
use crate::cli::JobArgs;
use crate::config::SerialOutput;
use crate::seccomp::{spawn_filtered, ThreadKind};
use crate::slot::Slot;
use crate::snapshot::restore::RestoreSpec;
use crate::vmm::{GuestExit, MachineSpec, RunReport, StopHandle, Vmm, VsockSpec};
use work::{NotStarted, Work, GUEST_SCRIPT, NOT_STARTED_CODE};

/// How long a cancelled job gets between SIGTERM and SIGKILL.
const CANCEL_GRACE: Duration = Duration::from_secs(1);

/// What the job thread hears about the VM.
enum VmEvent {
    BootDone(Duration),
    /// A restored guest's agent did not answer.
    NotReady(String),
    Ended(anyhow::Result<RunReport>),
}

/// A pulled image's Env, WorkingDir and User as the job's defaults (`--env` and `--cwd`
/// come after and win); images made otherwise have none.
fn image_defaults(
    request: &mut ExecRequest,
    store: Option<&Path>,
    name: &str,
) -> anyhow::Result<()> {
    let store = crate::image::Store::locate(store);
    let crate::image::Source::Oci { defaults, .. } = store.meta(name)?.source else {
        return Ok(());
    };
    if let Some(why) = &defaults.user_error {
        bail!(
            "image {name:?} asks to run as User {:?}, but {why}",
            defaults.user
        );
    }
    for line in &defaults.env {
        if let Some((k, v)) = line.split_once('=') {
            request.env.push((k.to_string(), v.to_string()));
        }
    }
    if let Some(home) = &defaults.home {
        request.env.retain(|(k, _)| k != "HOME");
        request.env.push(("HOME".to_string(), home.clone()));
    }
    if !defaults.working_dir.is_empty() {
        request.cwd = Some(defaults.working_dir.clone());
    }
    if let Some(uid) = defaults.uid.filter(|&u| u != 0) {
        request.uid = Some(uid);
        request.gid = defaults.gid;
    }
    Ok(())
}

pub fn job(args: &JobArgs, start: Instant) -> anyhow::Result<ExitCode> {
    let mut work = Work::new(args)?;
    if let Some(name) = &args.vm.image {
        image_defaults(&mut work.request, args.vm.store.as_deref(), name)?;
    }
    work.request.env.extend(parse_env(&args.env)?);
    if args.cwd.is_some() {
        work.request.cwd = args.cwd.clone();
    }

    let runtime = RuntimeDir::create("job")?;
    let uds = runtime.path().join("vsock.sock");
    let (events, vm_events) = channel();
    let (vmm, _slot) = match &args.from_snapshot {
        Some(snapshot) => {
            let net = args
                .vm
                .net
                .clone()
                .map(crate::net::NetConfig::with_fresh_mac);
            let identity = super::restore::CloneIdentity {
                hostname: None,
                mac: net.as_ref().and_then(|n| n.mac),
            };
            let vmm = restored_vm(args, net, snapshot, &uds, runtime.path(), start)?;
            let slot = args
                .vm
                .slot
                .enter(vmm.machine.memory_mib, vmm.machine.vcpus)?;
            // No boot-done mark comes from a restored guest: its agent is ready once it
            // answers, with the clock and entropy refreshed.
            let (ready, uds, timeout) = (
                events.clone(),
                uds.clone(),
                Duration::from_secs(args.boot_timeout),
            );
            let filters = match vmm.seccomp_enabled() {
                true => Some(crate::seccomp::Filters::get()?),
                false => None,
            };
            spawn_filtered(
                filters.as_ref(),
                ThreadKind::AgentClient,
                "kiln-refresh",
                move || {
                    let event = match super::restore::refresh_guest(&uds, timeout, &identity) {
                        Ok(()) => VmEvent::BootDone(start.elapsed()),
                        Err(e) => VmEvent::NotReady(format!("{e:#}")),
                    };
                    let _ = ready.send(event);
                },
            )
            .context("cannot start the guest refresh thread")?;
            (vmm, slot)
        }
        None => booted_vm(args, &uds, runtime.path(), events.clone(), start)?,
    };
    let filters = seccomp_filters(&vmm)?;
    let stop = Arc::new(vmm.stop_handle()?);
    let vm_thread = std::thread::Builder::new()
        .name("kiln-vmm".into())
        .spawn(move || {
            let report = vmm.run().map_err(anyhow::Error::from);
            let _ = events.send(VmEvent::Ended(report));
        })
        .context("cannot start the VM thread")?;
    let cancel = Cancel::install(uds.clone(), stop.clone(), filters.as_ref())?;

    let docker = args
        .docker
        .then(|| Duration::from_secs(args.docker_timeout.max(1)));
    let outcome = run_job(&uds, &work, &vm_events, &cancel, args.boot_timeout, docker);
    cancel.finished.set();
    stop.stop();
    let report = wait_vm_end(&vm_events);
    let _ = vm_thread.join();
    drop(runtime);

    let signo = cancel.signal.load(Ordering::Relaxed);
    let (code, job_ms, boot_ms, docker_ms) = match outcome {
        _ if signo != 0 => {
            eprintln!("kiln: job cancelled by signal {signo}");
            (128 + signo, None, None, None)
        }
        Ok(done) => (
            done.code,
            Some(done.job_time),
            Some(done.boot_time),
            done.docker_ready,
        ),
        Err(e) if e.is::<NotStarted>() => {
            eprintln!(
                "kiln: error: {}",
                work.not_started(&e.to_string(), args.vm.image.as_deref())
            );
            (NOT_STARTED_CODE, None, None, None)
        }
        Err(e) => {
            // The VM ending on its own is often why the job broke off: say how it ended.
            if let Some(report) = report.filter(|r| !matches!(r.exit, GuestExit::Stopped)) {
                eprintln!("kiln: error: the VM ended: {}", describe_exit(&report));
            }
            return Err(e);
        }
    };
    if args.json {
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        let mut report =
            serde_json::json!({"exit_code": code, "boot_ms": ms(boot_ms), "job_ms": ms(job_ms)});
        if args.docker {
            report["docker_ms"] = serde_json::json!(ms(docker_ms));
        }
        eprintln!("{report}");
    }
    Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)))
}

/// A fresh VM booted as the flags say, with a vsock device at `uds`.
fn booted_vm(
    args: &JobArgs,
    uds: &Path,
    runtime: &Path,
    events: std::sync::mpsc::Sender<VmEvent>,
    start: Instant,
) -> anyhow::Result<(Vmm, Option<Slot>)> {
    let mut config = args.vm.to_config()?;
    // Without an initramfs or a root disk, the guest boots the default agent initramfs.
    if config.initrd.is_none() && !config.disks.iter().any(|d| d.root) {
        config.initrd = Some(crate::defaults::agent_initramfs()?);
    }
    if args.vm.serial.is_none() && !config_sets_serial(args.vm.config.as_deref())? {
        config.serial = SerialOutput::Null;
    }
    // A job never writes an image: a disk with neither `ro`, `overlay=` nor `rw` gets a
    // temporary overlay in the runtime directory, removed with it.
    for (index, disk) in config.disks.iter_mut().enumerate() {
        if !disk.read_only && !disk.rw && disk.overlay.is_none() {
            disk.overlay = Some(runtime.join(format!("disk-{index}.overlay")));
        }
    }
    check_files(&config)?;
    let slot = args.vm.slot.enter(config.memory_mib, config.vcpus)?;
    let mut spec = MachineSpec::from_config(&config, console_sink(&config.serial)?, start);
    spec.vsock = Some(VsockSpec {
        cid: 3,
        uds_path: uds.to_owned(),
    });
    spec.boot_done = Some(Box::new(move |t| {
        let _ = events.send(VmEvent::BootDone(t));
    }));
    spec.snapshot_on_request = snapshot_on_request(args)?;
    Ok((Vmm::build(spec)?, slot))
}

/// Where `kiln-snapshot` in the guest puts its snapshot: `--snapshot-at`, made absolute so
/// that the snapshot lands where the user meant whatever the VMM's working directory.
fn snapshot_on_request(args: &JobArgs) -> anyhow::Result<Option<PathBuf>> {
    args.snapshot_at
        .as_deref()
        .map(|dir| std::path::absolute(dir).context("--snapshot-at"))
        .transpose()
}

/// A VM restored from `snapshot`, its vsock device at `uds`.
fn restored_vm(
    args: &JobArgs,
    net: Option<crate::net::NetConfig>,
    snapshot: &Path,
    uds: &Path,
    runtime: &Path,
    start: Instant,
) -> anyhow::Result<Vmm> {
    check_snapshot_dir(snapshot)?;
    let serial = args.vm.serial.clone().unwrap_or(SerialOutput::Null);
    let vmm = Vmm::restore(RestoreSpec {
        snapshot: snapshot.to_owned(),
        console: console_sink(&serial)?,
        vsock_uds: Some(uds.to_owned()),
        start,
        boot_done: None,
        track_dirty_pages: args.vm.track_dirty_pages,
        seccomp: !args.vm.no_seccomp,
        disk_overlays: Vec::new(),
        disk_scratch: Some(runtime.to_owned()),
        net,
        snapshot_on_request: snapshot_on_request(args)?,
        // Disk images from the snapshot directory or the image store only.
        paths: crate::cli::SnapshotImages::default().rules(),
    })
    .with_context(|| format!("snapshot {}", snapshot.display()))?;
    if vmm.devices.vsock().is_none() {
        bail!(
            "snapshot {} has no vsock device, so no guest agent to run the job",
            snapshot.display()
        );
    }
    Ok(vmm)
}

/// A finished job.
struct JobDone {
    code: i32,
    boot_time: Duration,
    job_time: Duration,
    /// dockerd's start-to-ready time, as the guest measured it (`--docker`; zero when it
    /// was already running in a restored VM).
    docker_ready: Option<Duration>,
}

fn run_job(
    uds: &Path,
    work: &Work,
    vm_events: &std::sync::mpsc::Receiver<VmEvent>,
    cancel: &Cancel,
    boot_timeout: u64,
    docker: Option<Duration>,
) -> anyhow::Result<JobDone> {
    let boot_time = match vm_events.recv_timeout(Duration::from_secs(boot_timeout)) {
        Ok(VmEvent::BootDone(t)) => t,
        Ok(VmEvent::Ended(report)) => bail!(
            "the VM ended before its agent was ready: {}",
            describe(&report)
        ),
        Ok(VmEvent::NotReady(why)) => bail!("the restored guest's agent is not ready: {why}"),
        Err(RecvTimeoutError::Timeout) => {
            bail!("the guest agent did not mark boot done within {boot_timeout} s")
        }
        Err(RecvTimeoutError::Disconnected) => bail!("the VM thread went away"),
    };
    let mut client = connect_agent(uds)?;
    let docker_ready = match docker {
        Some(timeout) => Some(start_docker(&mut client, timeout)?),
        None => None,
    };
    let started = Instant::now();
    if let Some(script) = &work.script {
        client
            .put_file(GUEST_SCRIPT, 0o755, &mut &script[..])
            .context("cannot copy the job script into the guest")?;
    }
    let mut running = false;
    let status = exec_streamed(&mut client, &work.request, &mut |id| {
        running = true;
        cancel.arm(id);
    });
    let status = match status {
        Err(ClientError::Remote(reason)) if !running => return Err(NotStarted(reason).into()),
        status => status.context("the job did not run to its end")?,
    };
    Ok(JobDone {
        code: status.shell_code(),
        boot_time,
        job_time: started.elapsed(),
        docker_ready,
    })
}

/// `--docker`: the agent starts dockerd and waits for it; its failure is the job's one
/// error line.
fn start_docker(client: &mut Client, timeout: Duration) -> anyhow::Result<Duration> {
    use kiln_agent::docker::{self, Report};
    match docker::request(client, false, timeout) {
        Ok(Report::Ready { ms, .. }) => Ok(Duration::from_millis(ms)),
        Ok(Report::Absent) => bail!("--docker: the guest reported no dockerd"),
        Err(e) => bail!("--docker: {e}"),
    }
}

/// Waits for the VM thread's report (after it was told to stop).
fn wait_vm_end(vm_events: &std::sync::mpsc::Receiver<VmEvent>) -> Option<RunReport> {
    loop {
        match vm_events.recv() {
            Ok(VmEvent::Ended(Ok(report))) => return Some(report),
            Ok(VmEvent::Ended(Err(e))) => {
                eprintln!("kiln: error: the VM failed: {e:#}");
                return None;
            }
            Ok(VmEvent::BootDone(_) | VmEvent::NotReady(_)) => continue,
            Err(_) => return None,
        }
    }
}

fn describe(report: &anyhow::Result<RunReport>) -> String {
    match report {
        Ok(report) => describe_exit(report),
        Err(e) => format!("{e:#}"),
    }
}

fn describe_exit(report: &RunReport) -> String {
    match &report.exit {
        GuestExit::Panic(line) => format!("guest kernel panic: {line}"),
        GuestExit::Fault(msg) => format!("VM fault: {msg}"),
        exit => format!("guest {}", exit.kind()),
    }
}

/// Whether a config file names a serial output (then it wins over `job`'s default of null).
fn config_sets_serial(config: Option<&Path>) -> anyhow::Result<bool> {
    let Some(path) = config else { return Ok(false) };
    let text = std::fs::read_to_string(path)?;
    Ok(text.lines().any(|l| l.trim_start().starts_with("serial")))
}

/// Turns SIGINT/SIGTERM into a cancel of the running job and a stop of the VM.
struct Cancel {
    exec_id: Arc<OnceLock<u64>>,
    signal: Arc<AtomicI32>,
    finished: Arc<Finished>,
}

/// Set when the job's exec has returned, so a cancel need not escalate to SIGKILL.
#[derive(Default)]
struct Finished {
    done: Mutex<bool>,
    changed: Condvar,
}

impl Finished {
    fn set(&self) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.changed.notify_all();
    }

    /// Waits up to `timeout`; true if the job finished.
    fn wait(&self, timeout: Duration) -> bool {
        let guard = self.done.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |done| !*done)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }
}

impl Cancel {
    /// The job's signal thread, under the agent-client seccomp filter (it asks the guest
    /// agent to signal the job) when `filters` is given.
    fn install(
        uds: PathBuf,
        stop: Arc<StopHandle>,
        filters: Option<&crate::seccomp::Filters>,
    ) -> anyhow::Result<Cancel> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .context("cannot install signal handlers")?;
        let exec_id = Arc::new(OnceLock::new());
        let signal = Arc::new(AtomicI32::new(0));
        let finished = Arc::new(Finished::default());
        let (target, caught, job_finished) = (exec_id.clone(), signal.clone(), finished.clone());
        spawn_filtered(
            filters,
            ThreadKind::AgentClient,
            "kiln-job-signals",
            move || {
                if let Some(signo) = signals.forever().next() {
                    caught.store(signo, Ordering::Relaxed);
                    if let Some(id) = target.get().copied() {
                        cancel_exec(&uds, id, &job_finished);
                    }
                    stop.stop();
                }
            },
        )
        .context("cannot start the signal thread")?;
        Ok(Cancel {
            exec_id,
            signal,
            finished,
        })
    }

    fn arm(&self, exec_id: u64) {
        let _ = self.exec_id.set(exec_id);
    }
}

/// SIGTERM to the job's process group, then SIGKILL if it has not ended after
/// [`CANCEL_GRACE`].
fn cancel_exec(uds: &Path, exec_id: u64, finished: &Finished) {
    let send = |signo| {
        Client::connect_with_timeout(uds, AGENT_PORT, Some(CANCEL_GRACE))
            .and_then(|mut c| c.signal(SignalTarget::Exec(exec_id), signo))
    };
    if let Err(e) = send(libc::SIGTERM) {
        tracing::warn!("cannot pass SIGTERM to the job: {e}");
        return;
    }
    if !finished.wait(CANCEL_GRACE) {
        if let Err(e) = send(libc::SIGKILL) {
            tracing::warn!("cannot pass SIGKILL to the job: {e}");
        }
    }
}
