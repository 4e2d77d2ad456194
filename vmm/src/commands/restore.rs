//! `kiln restore`: rebuild a VM from a snapshot directory and run it until it ends, as
//! `kiln run` does. With a vsock device, a background thread refreshes the guest once its
//! agent answers: the wall clock (the snapshot's is stale) and fresh entropy (every clone
//! of a snapshot starts with the same RNG state).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use kiln_agent::client::Client;
use kiln_agent::protocol::AGENT_PORT;

use super::common::{check_snapshot_dir, console_sink, run_to_end, RuntimeDir, Sockets};
use crate::cli::RestoreArgs;
use crate::snapshot::restore::RestoreSpec;
use crate::vmm::Vmm;

/// How long the guest agent has to answer after a restore before kiln gives up on
/// refreshing its clock and entropy.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Random bytes sent to each restored guest.
pub const ENTROPY_BYTES: usize = 32;

pub fn restore(args: &RestoreArgs, start: Instant) -> anyhow::Result<ExitCode> {
    check_snapshot_dir(&args.snapshot)?;
    let access = crate::api::SocketAccess::from_flag(args.socket_group.as_deref())?;
    // Overlay disks without --disk-overlay get their copies here, removed at the end.
    let runtime = RuntimeDir::create("restore")?;
    let net = args.net.clone().map(crate::net::NetConfig::with_fresh_mac);
    let vmm = Vmm::restore(RestoreSpec {
        snapshot: args.snapshot.clone(),
        console: console_sink(&args.serial)?,
        vsock_uds: args.vsock.clone(),
        start,
        boot_done: None,
        track_dirty_pages: args.track_dirty_pages,
        seccomp: !args.no_seccomp,
        disk_overlays: args.disk_overlay.clone(),
        disk_scratch: Some(runtime.path().to_owned()),
        net: net.clone(),
        snapshot_on_request: None,
        paths: args.images.rules(),
    })
    .with_context(|| format!("snapshot {}", args.snapshot.display()))?;
    // Guest memory is charged to the slot as the restored guest touches it.
    let _slot = args.slot.enter(vmm.machine.memory_mib, vmm.machine.vcpus)?;
    if vmm.devices.vsock().is_none() {
        if let Some(vsock) = &args.vsock {
            bail!(
                "--vsock {}: the snapshot has no vsock device; leave --vsock out",
                vsock.display()
            );
        }
    } else if let Some(uds) = &args.vsock {
        let identity = CloneIdentity {
            hostname: args.hostname.clone(),
            mac: net.and_then(|n| n.mac),
        };
        // The refresh thread starts before the VM runs: it needs the filters now (without
        // the warning that run_to_end prints when seccomp is off).
        let filters = match vmm.seccomp_enabled() {
            true => Some(crate::seccomp::Filters::get()?),
            false => None,
        };
        spawn_guest_refresh(uds.clone(), identity, filters.as_ref())?;
    }
    let sockets = Sockets {
        api: args.api.as_deref(),
        vsock: args.vsock.as_deref(),
        snapshot: Some(&args.snapshot),
    };
    let code = run_to_end(vmm, sockets, args.json, access);
    drop(runtime);
    code
}

/// What makes a restored clone itself, beyond clock and entropy.
#[derive(Debug, Clone, Default)]
pub struct CloneIdentity {
    /// The guest's hostname.
    pub hostname: Option<String>,
    /// The MAC of the clone's network device, which the guest's eth0 must take.
    pub mac: Option<kiln_devices::virtio::net::MacAddr>,
}

fn spawn_guest_refresh(
    uds: PathBuf,
    identity: CloneIdentity,
    filters: Option<&crate::seccomp::Filters>,
) -> anyhow::Result<()> {
    use crate::seccomp::{spawn_filtered, ThreadKind};
    spawn_filtered(
        filters,
        ThreadKind::AgentClient,
        "kiln-refresh",
        move || match refresh_guest(&uds, AGENT_TIMEOUT, &identity) {
            Ok(()) => {
                tracing::info!("guest clock set and {ENTROPY_BYTES} bytes of fresh entropy added")
            }
            Err(e) => {
                tracing::warn!("the restored guest's clock and entropy were not refreshed: {e:#}")
            }
        },
    )
    .context("cannot start the guest refresh thread")?;
    Ok(())
}

/// How long one refresh attempt may take. A host connection the guest accepts before it
/// has handled the vsock transport reset is then dropped by the guest without a word to
/// the host, so an attempt that hangs is abandoned and retried rather than waited on for
/// the whole [`AGENT_TIMEOUT`].
pub const REFRESH_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Waits up to `timeout` for the guest agent behind `uds`, then sets the guest's wall
/// clock to now and adds [`ENTROPY_BYTES`] random bytes to its entropy pool. Each attempt
/// is bounded by [`REFRESH_ATTEMPT_TIMEOUT`] and retried until `timeout` (both requests
/// may be repeated safely: the clock is set to the then current time, and extra entropy
/// does no harm).
/// With `identity`, the guest's hostname and eth0's MAC are set too (each clone its own).
pub fn refresh_guest(
    uds: &Path,
    timeout: Duration,
    identity: &CloneIdentity,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = left
            .min(REFRESH_ATTEMPT_TIMEOUT)
            .max(Duration::from_millis(1));
        match refresh_once(uds, attempt, identity) {
            Ok(()) => return Ok(()),
            Err(e) if deadline.saturating_duration_since(Instant::now()).is_zero() => {
                return Err(e.context(format!("the guest agent did not answer within {timeout:?}")))
            }
            Err(e) => {
                tracing::debug!("guest refresh attempt failed, retrying: {e:#}");
                // Polling interval between attempts (a guest with no listener yet answers
                // at once), not a synchronization.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn refresh_once(uds: &Path, timeout: Duration, identity: &CloneIdentity) -> anyhow::Result<()> {
    // One connection, no ping first: setting the clock is the probe (both requests may be
    // repeated when an attempt fails).
    let mut client = Client::connect_with_timeout(uds, AGENT_PORT, Some(timeout))
        .context("cannot reach the guest agent")?;
    let entropy = random_bytes(ENTROPY_BYTES)?;
    client
        .set_time(SystemTime::now())
        .context("cannot set the guest's clock")?;
    client
        .add_entropy(&entropy)
        .context("cannot add entropy to the guest")?;
    if let Some(name) = &identity.hostname {
        guest_exec(uds, timeout, &["hostname", name])?;
    }
    if let Some(mac) = identity.mac {
        // The agent itself does it (its own binary is /proc/1/exe): images need no `ip`.
        guest_exec(
            uds,
            timeout,
            &["/proc/1/exe", "net-refresh", &mac.to_string()],
        )?;
    }
    Ok(())
}

/// Run `argv` in the guest through the agent; an error unless it exits 0.
fn guest_exec(uds: &Path, timeout: Duration, argv: &[&str]) -> anyhow::Result<()> {
    let req = kiln_agent::protocol::ExecRequest::new(argv.iter().copied());
    let mut client = Client::connect_with_timeout(uds, AGENT_PORT, Some(timeout))
        .context("cannot reach the guest agent")?;
    let mut err = Vec::new();
    let status = client
        .exec(&req, &mut std::io::sink(), &mut err)
        .with_context(|| format!("cannot run `{}` in the guest", argv.join(" ")))?;
    anyhow::ensure!(
        status.success(),
        "`{}` failed in the guest: {status:?} {}",
        argv.join(" "),
        String::from_utf8_lossy(&err).trim()
    );
    Ok(())
}

/// `len` bytes from the kernel's CSPRNG (getrandom(2)).
pub(crate) fn random_bytes(len: usize) -> anyhow::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    kiln_devices::entropy::fill_random(&mut buf).context("getrandom failed")?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    #[test]
    fn random_bytes_differ() {
        let a = super::random_bytes(32).unwrap();
        let b = super::random_bytes(32).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
