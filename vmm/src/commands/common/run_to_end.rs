//! Running a built or restored VM until it ends: what `kiln run` and `kiln restore` share.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use anyhow::Context;

use crate::api::{ApiServer, SocketAccess};
use crate::seccomp::{spawn_filtered, Filters, ThreadKind};
use crate::vmm::{GuestExit, StopHandle, Vmm};

/// On SIGINT or SIGTERM, stops the VM (its console is flushed and the report printed as
/// for any other exit), from a thread under the signal thread's seccomp filter (when
/// `filters` is given). Returns where the signal number is recorded.
fn stop_on_signals(stop: StopHandle, filters: Option<&Filters>) -> anyhow::Result<Arc<AtomicI32>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("cannot install signal handlers")?;
    let caught = Arc::new(AtomicI32::new(0));
    let record = caught.clone();
    spawn_filtered(filters, ThreadKind::Signals, "kiln-signals", move || {
        if let Some(signo) = signals.forever().next() {
            record.store(signo, Ordering::Relaxed);
            stop.stop();
        }
    })
    .context("cannot start the signal thread")?;
    Ok(caught)
}

/// The seccomp filters the VM's threads will run under, or `None` (and a loud warning) when
/// they are turned off.
pub(crate) fn seccomp_filters(vmm: &Vmm) -> anyhow::Result<Option<Filters>> {
    if vmm.seccomp_enabled() {
        return Ok(Some(Filters::get()?));
    }
    eprintln!(
        "kiln: WARNING: seccomp is off (--no-seccomp): the VMM's threads may make any syscall; \
         use this only to debug a filter"
    );
    Ok(None)
}

fn register(
    vmm: &Vmm,
    dir: &Path,
    api: &Path,
    sockets: &Sockets,
) -> std::io::Result<crate::registry::Registration> {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let record = crate::registry::VmRecord {
        pid: 0,
        start_ticks: 0,
        started_unix: 0,
        vcpus: vmm.machine.vcpus,
        memory_mib: vmm.machine.memory_mib,
        api: absolute(api),
        vsock: sockets.vsock.map(absolute),
        snapshot: sockets.snapshot.map(absolute),
    };
    crate::registry::register(dir, record)
}

/// Gives the VM's vsock socket (if any) the peer check and group of `access`.
fn share_vsock(vmm: &Vmm, access: SocketAccess) -> anyhow::Result<()> {
    let Some(vsock) = vmm.devices.vsock() else {
        return Ok(());
    };
    let mut device = vsock
        .lock()
        .map_err(|_| anyhow::anyhow!("the vsock device is poisoned"))?;
    device.set_peer_policy(access.peers());
    let path = device.uds_path();
    access
        .apply(path)
        .with_context(|| format!("cannot give vsock socket {} to its group", path.display()))
}

/// Where a VM's host-side sockets are, and what it came from: what `kiln ps` shows.
pub(crate) struct Sockets<'a> {
    pub api: Option<&'a Path>,
    pub vsock: Option<&'a Path>,
    pub snapshot: Option<&'a Path>,
}

/// Runs a built (or restored) VM until it ends, with its API socket if `sockets.api` is
/// given, and SIGINT/SIGTERM stopping it; prints how it ended (and the JSON report if
/// `json`) and returns the exit code: 0 when the guest reset, halted or a `shutdown`
/// request stopped it, 128 + N when signal N did, 1 on a panic or fault.
/// Both sockets are 0600 unless `access` opens them to a group.
pub(crate) fn run_to_end(
    vmm: Vmm,
    sockets: Sockets,
    json: bool,
    access: SocketAccess,
) -> anyhow::Result<ExitCode> {
    share_vsock(&vmm, access)?;
    let filters = seccomp_filters(&vmm)?;
    let stopped_by = stop_on_signals(vmm.stop_handle()?, filters.as_ref())?;
    let api_server = match sockets.api {
        Some(path) => Some(ApiServer::start(path, vmm.controller(), filters, access)?),
        None => None,
    };
    // A VM with a control API is listed by `kiln ps` while it runs.
    let registration = match (sockets.api, crate::registry::dir()) {
        (Some(api), Some(dir)) => register(&vmm, &dir, api, &sockets)
            .map_err(|e| tracing::warn!("kiln ps will not list this VM: {e}"))
            .ok(),
        _ => None,
    };
    let report = vmm.run();
    // The VM is gone: the socket and the record go with it.
    drop(api_server);
    drop(registration);
    let report = report?;
    let signo = stopped_by.load(Ordering::Relaxed);
    let code: u8 = match report.exit {
        // A `shutdown` request through the API: a normal end.
        GuestExit::Stopped if signo == 0 => 0,
        // 128 + the signal number, as a shell reports a process killed by it.
        GuestExit::Stopped => 128 + u8::try_from(signo).unwrap_or(0),
        ref exit if exit.is_success() => 0,
        _ => 1,
    };
    match &report.exit {
        GuestExit::Reset | GuestExit::Halted => tracing::info!("guest {}", report.exit.kind()),
        GuestExit::Panic(line) => eprintln!("kiln: error: guest kernel panic: {line}"),
        GuestExit::Fault(msg) => eprintln!("kiln: error: VM fault: {msg}"),
        GuestExit::Stopped if signo == 0 => tracing::info!("VM stopped by a shutdown request"),
        GuestExit::Stopped => eprintln!("kiln: VM stopped by a signal"),
    }
    if json {
        let detail = match &report.exit {
            GuestExit::Panic(s) | GuestExit::Fault(s) => Some(s.as_str()),
            _ => None,
        };
        let json = serde_json::json!({
            "result": report.exit.kind(),
            "boot_ms": report.boot_time.map(|t| t.as_secs_f64() * 1e3),
            "setup_ms": report.setup_time.map(|t| t.as_secs_f64() * 1e3),
            // Each set-up phase's end, from the process's start, in order.
            "phases_ms": report
                .phases
                .iter()
                .map(|(name, t)| serde_json::json!([name, t.as_secs_f64() * 1e3]))
                .collect::<Vec<_>>(),
            "exit_code": code,
            "detail": detail,
        });
        let mut out = std::io::stdout().lock();
        writeln!(out, "\n{json}")?;
    }
    Ok(ExitCode::from(code))
}
