//! `kiln fork`: N clones of one snapshot, each a `kiln restore` child process.
//!
//! Separate processes rather than one supervisor: each maps the snapshot's memory file
//! copy-on-write, so the clones share every page none of them wrote through the page
//! cache, and a clone that crashes takes only itself down. This process starts them,
//! reports their paths, forwards SIGINT/SIGTERM to them and waits for them all.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use super::common::check_snapshot_dir;
use crate::api;
use crate::cli::ForkArgs;
use crate::vmm::Request;

/// How long a clone has to answer on its API socket before kiln fork reports it anyway.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One clone's paths.
struct ClonePaths {
    /// The clone's hostname, `kiln-clone-<i>`.
    hostname: String,
    vsock: Option<PathBuf>,
    api: Option<PathBuf>,
    serial: Option<PathBuf>,
    /// The clone's TAP (`--net-tap` with `{i}` replaced).
    tap: Option<String>,
}

/// The pids of the clones still running, for the signal thread; `None` once reaped.
type Running = Arc<Mutex<Vec<Option<i32>>>>;

pub fn fork(args: &ForkArgs) -> anyhow::Result<ExitCode> {
    check_snapshot_dir(&args.snapshot)?;
    // Check the snapshot once here rather than failing N times in the clones.
    let state = crate::snapshot::read_state(&args.snapshot)
        .with_context(|| format!("snapshot {}", args.snapshot.display()))?;
    match (state.devices.vsock(), &args.vsock_prefix) {
        (Some(_), None) => bail!("the snapshot has a vsock device: give --vsock-prefix"),
        (None, Some(_)) => bail!("the snapshot has no vsock device; leave --vsock-prefix out"),
        _ => {}
    }
    match (state.devices.net(), &args.net_tap) {
        (Some(_), None) => {
            bail!("the snapshot has a network device: give --net-tap, e.g. kiln{{i}}")
        }
        (None, Some(_)) => bail!("the snapshot has no network device; leave --net-tap out"),
        (_, Some(p)) if !p.contains("{i}") => {
            bail!("--net-tap {p:?}: put {{i}} in it, so that each clone gets its own TAP")
        }
        _ => {}
    }
    drop(state);
    let snapshot = std::path::absolute(&args.snapshot)
        .with_context(|| format!("cannot make {} absolute", args.snapshot.display()))?;
    let per_clone = |prefix: &Option<String>, i: u32| {
        prefix.as_ref().map(|p| PathBuf::from(format!("{p}-{i}")))
    };
    let paths: Vec<ClonePaths> = (0..args.count)
        .map(|i| ClonePaths {
            hostname: format!("kiln-clone-{i}"),
            vsock: per_clone(&args.vsock_prefix, i),
            api: per_clone(&args.api_prefix, i),
            serial: per_clone(&args.serial_prefix, i),
            tap: args
                .net_tap
                .as_ref()
                .map(|p| p.replace("{i}", &i.to_string())),
        })
        .collect();
    for p in paths.iter().flat_map(|p| [&p.vsock, &p.api]).flatten() {
        if p.symlink_metadata().is_ok() {
            bail!(
                "{} already exists; remove it or choose another prefix",
                p.display()
            );
        }
    }
    let exe = std::env::current_exe().context("cannot find the kiln executable")?;

    let running: Running = Arc::new(Mutex::new(Vec::new()));
    let caught = forward_signals(running.clone())?;
    let mut children: Vec<Child> = Vec::with_capacity(paths.len());
    for (i, p) in paths.iter().enumerate() {
        let spawned = clone_command(&exe, &snapshot, &args.images, p).spawn();
        let mut list = running.lock().unwrap_or_else(|e| e.into_inner());
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                signal_all(&list, libc::SIGTERM);
                drop(list);
                for mut c in children {
                    let _ = c.wait();
                }
                bail!("cannot start clone {i}: {e}");
            }
        };
        let pid = i32::try_from(child.id()).ok();
        list.push(pid);
        let signo = caught.load(Ordering::SeqCst);
        // A signal came while this clone was being started: it gets it too.
        if signo != 0 {
            signal_all(&list[i..], signo);
        }
        drop(list);
        children.push(child);
        if signo != 0 {
            break;
        }
    }
    for (i, (child, p)) in children.iter_mut().zip(&paths).enumerate() {
        if let Some(api) = &p.api {
            wait_answering(api, child, &caught);
        }
        let line = json!({
            "clone": i, "pid": child.id(), "vsock": p.vsock, "api": p.api, "serial": p.serial,
        });
        println!("{line}");
    }
    let mut failed = Vec::new();
    for (i, child) in children.iter_mut().enumerate() {
        let status = child.wait();
        running.lock().unwrap_or_else(|e| e.into_inner())[i] = None;
        let code = match status {
            Ok(s) => exit_code(s),
            Err(e) => {
                tracing::warn!("cannot wait for clone {i}: {e}");
                1
            }
        };
        println!("{}", json!({"clone": i, "exit_code": code}));
        if code != 0 {
            failed.push(format!("clone {i} exited {code}"));
        }
    }
    let signo = caught.load(Ordering::SeqCst);
    if signo != 0 {
        eprintln!("kiln: fork stopped by signal {signo}; it was passed on to every clone");
        return Ok(ExitCode::from(128 + u8::try_from(signo).unwrap_or(0)));
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} clones failed: {}",
            failed.len(),
            children.len(),
            failed.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn clone_command(
    exe: &Path,
    snapshot: &Path,
    images: &crate::cli::SnapshotImages,
    p: &ClonePaths,
) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("restore").arg("--snapshot").arg(snapshot);
    cmd.args(images.to_args());
    if let Some(v) = &p.vsock {
        cmd.arg("--vsock").arg(v);
        cmd.arg("--hostname").arg(&p.hostname);
    }
    if let Some(a) = &p.api {
        cmd.arg("--api").arg(a);
    }
    if let Some(tap) = &p.tap {
        // Each clone's restore picks a new random MAC.
        cmd.arg("--net").arg(format!("tap={tap}"));
    }
    match &p.serial {
        Some(s) => cmd.arg("--serial").arg(s),
        None => cmd.arg("--serial").arg("null"),
    };
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    cmd
}

/// 128 + N for a clone killed by signal N, as a shell reports it.
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

fn signal_all(pids: &[Option<i32>], signo: i32) {
    for pid in pids.iter().flatten() {
        // SAFETY: kill() only sends a signal, to a child of ours not reaped yet.
        unsafe { libc::kill(*pid, signo) };
    }
}

/// SIGINT/SIGTERM go to every running clone; the first one is recorded.
fn forward_signals(running: Running) -> anyhow::Result<Arc<AtomicI32>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("cannot install signal handlers")?;
    let caught = Arc::new(AtomicI32::new(0));
    let record = caught.clone();
    std::thread::Builder::new()
        .name("kiln-fork-signals".into())
        .spawn(move || {
            for signo in signals.forever() {
                let list = running.lock().unwrap_or_else(|e| e.into_inner());
                let _ = record.compare_exchange(0, signo, Ordering::SeqCst, Ordering::SeqCst);
                signal_all(&list, signo);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(caught)
}

/// Waits until the clone answers a `status` request on `api`, it exits, a signal comes,
/// or [`READY_TIMEOUT`] passes (then it warns and goes on).
fn wait_answering(api: &Path, child: &mut Child, caught: &AtomicI32) {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if api::call(api, &Request::Status, Some(Duration::from_secs(5))).is_ok() {
            return;
        }
        if caught.load(Ordering::SeqCst) != 0 || !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                "clone {} does not answer on {} yet",
                child.id(),
                api.display()
            );
            return;
        }
        // Polling interval between attempts, not a synchronization.
        std::thread::sleep(Duration::from_millis(5));
    }
}
