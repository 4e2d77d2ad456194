//! `kiln exec`: run a command in a running VM through its agent, streaming its output, and
//! exit with its exit code.

use std::process::ExitCode;

use anyhow::Context;
use kiln_agent::client::{connect_ready, Client, ExecIo};
use kiln_agent::protocol::{ExecRequest, SignalTarget, AGENT_PORT};

use crate::cli::ExecArgs;

/// How long `kiln exec` and `kiln cp` keep trying to reach the agent. Right after a
/// snapshot restore the guest silently drops connections made before it has handled the
/// vsock transport reset; those attempts time out and are retried within this bound.
pub(crate) const CONNECT_TOTAL: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection to the agent behind `uds` on which it has answered a ping; retried within
/// [`CONNECT_TOTAL`]. The request sent on it afterwards is sent once, never repeated.
pub(crate) fn connect_agent(uds: &std::path::Path) -> anyhow::Result<Client> {
    connect_ready(uds, AGENT_PORT, CONNECT_TOTAL)
        .with_context(|| format!("cannot reach the agent through {}", uds.display()))
}

/// Splits `K=V`.
pub(crate) fn parse_env(pairs: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => anyhow::bail!("--env {p:?}: expected KEY=VALUE"),
        })
        .collect()
}

pub fn exec(args: &ExecArgs) -> anyhow::Result<ExitCode> {
    let mut req = ExecRequest::new(args.command.iter().map(String::as_str));
    req.env = parse_env(&args.env)?;
    req.cwd = args.cwd.clone();
    let mut client = connect_agent(&args.vsock)?;
    let cancel = forward_signals(args.vsock.clone())?;
    let status = client
        .exec_with(
            &req,
            ExecIo {
                stdin: None,
                stdout: &mut std::io::stdout(),
                stderr: &mut std::io::stderr(),
                on_started: Some(&mut |started| cancel.arm(started.exec_id)),
            },
        )
        .context("exec failed")?;
    Ok(ExitCode::from(
        u8::try_from(status.shell_code() & 0xff).unwrap_or(1),
    ))
}

/// Passes SIGINT/SIGTERM on to the exec's process group in the guest, on a second
/// connection (the first is busy streaming output).
pub(crate) struct Canceller {
    exec_id: std::sync::Arc<std::sync::OnceLock<u64>>,
}

impl Canceller {
    pub(crate) fn arm(&self, exec_id: u64) {
        let _ = self.exec_id.set(exec_id);
    }
}

pub(crate) fn forward_signals(uds: std::path::PathBuf) -> anyhow::Result<Canceller> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("cannot install signal handlers")?;
    let exec_id = std::sync::Arc::new(std::sync::OnceLock::new());
    let target = exec_id.clone();
    std::thread::Builder::new()
        .name("kiln-exec-signals".into())
        .spawn(move || {
            for signo in signals.forever() {
                let Some(id) = target.get().copied() else {
                    // Nothing started yet: behave as if there were no handler.
                    std::process::exit(128 + signo);
                };
                let sent = Client::connect_unix(&uds, AGENT_PORT)
                    .and_then(|mut c| c.signal(SignalTarget::Exec(id), signo));
                if let Err(e) = sent {
                    eprintln!("kiln: cannot pass signal {signo} to the guest: {e}");
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(Canceller { exec_id })
}
