//! `kiln exec`: run a command in a running VM through its agent, streaming its output, and
//! exit with its exit code.

use std::process::ExitCode;

use anyhow::Context;
use kiln_agent::client::Client;
use kiln_agent::protocol::{ExecRequest, SignalTarget, AGENT_PORT};

use super::common::{connect_agent, exec_streamed, parse_env};
use crate::cli::ExecArgs;

pub fn exec(args: &ExecArgs) -> anyhow::Result<ExitCode> {
    let mut req = ExecRequest::new(args.command.iter().map(String::as_str));
    req.env = parse_env(&args.env)?;
    req.cwd = args.cwd.clone();
    let mut client = connect_agent(&args.vsock)?;
    let cancel = forward_signals(args.vsock.clone())?;
    let status =
        exec_streamed(&mut client, &req, &mut |id| cancel.arm(id)).context("exec failed")?;
    Ok(ExitCode::from(
        u8::try_from(status.shell_code() & 0xff).unwrap_or(1),
    ))
}

/// Passes SIGINT/SIGTERM on to the exec's process group in the guest, on a second
/// connection (the first is busy streaming output).
struct Canceller {
    exec_id: std::sync::Arc<std::sync::OnceLock<u64>>,
}

impl Canceller {
    fn arm(&self, exec_id: u64) {
        let _ = self.exec_id.set(exec_id);
    }
}

fn forward_signals(uds: std::path::PathBuf) -> anyhow::Result<Canceller> {
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
