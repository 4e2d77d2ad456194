//! Signals of `kiln exec` and `kiln shell`, passed on to the guest: SIGINT, SIGTERM (and,
//! with a terminal, SIGHUP) to the exec's process group, on a connection of their own (the
//! first is busy streaming output); with a terminal, SIGWINCH as its new size.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use kiln_agent::client::{Client, Resizer};
use kiln_agent::protocol::{SignalTarget, WindowSize, AGENT_PORT};

use super::terminal;

/// Where the signals go, once the exec has started.
pub(crate) struct Forwarder {
    exec_id: Arc<OnceLock<u64>>,
    resizer: Arc<OnceLock<Resizer>>,
}

impl Forwarder {
    /// The exec has started: signals go to it from now on.
    pub(crate) fn arm(&self, exec_id: u64) {
        let _ = self.exec_id.set(exec_id);
    }

    /// The exec has started on a terminal first `asked` in size: its size follows this
    /// terminal's from now on, and a resize made meanwhile is sent now.
    pub(crate) fn arm_terminal(&self, exec_id: u64, resizer: Resizer, asked: WindowSize) {
        if let Some(now) = terminal::size().filter(|now| *now != asked) {
            send_size(&resizer, now);
        }
        let _ = self.resizer.set(resizer);
        self.arm(exec_id);
    }
}

fn send_size(resizer: &Resizer, size: WindowSize) {
    if let Err(e) = resizer.resize(size) {
        // "\r\n": the terminal is in raw mode.
        eprint!("kiln: cannot pass the terminal's new size to the guest: {e}\r\n");
    }
}

/// Starts the thread that passes signals on to the exec in the VM behind `uds`; with
/// `tty`, SIGHUP and SIGWINCH too. A signal that comes before the exec has started ends
/// kiln as the signal would (128 + N), with this terminal restored.
pub(crate) fn forward_signals(uds: PathBuf, tty: bool) -> anyhow::Result<Forwarder> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGWINCH};
    let mut wanted = vec![SIGINT, SIGTERM];
    if tty {
        wanted.extend([SIGHUP, SIGWINCH]);
    }
    let mut signals =
        signal_hook::iterator::Signals::new(wanted).context("cannot install signal handlers")?;
    let forwarder = Forwarder {
        exec_id: Arc::new(OnceLock::new()),
        resizer: Arc::new(OnceLock::new()),
    };
    let (target, resizer) = (forwarder.exec_id.clone(), forwarder.resizer.clone());
    std::thread::Builder::new()
        .name("kiln-exec-signals".into())
        .spawn(move || {
            for signo in signals.forever() {
                if signo == SIGWINCH {
                    if let (Some(r), Some(size)) = (resizer.get(), terminal::size()) {
                        send_size(r, size);
                    }
                    continue;
                }
                let Some(id) = target.get().copied() else {
                    // Nothing started yet: behave as if there were no handler.
                    terminal::restore();
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
    Ok(forwarder)
}
