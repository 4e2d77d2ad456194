//! This process's terminal for `kiln exec -t` and `kiln shell`: its size, raw mode (and
//! its restoring on every way out), and an exec on a guest terminal driven from it.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Mutex, PoisonError};

use anyhow::{bail, Context};
use kiln_agent::client::{Client, TtyIo};
use kiln_agent::protocol::{ExecRequest, WindowSize};

use super::signals::forward_signals;

/// The size used when stdin's terminal reports none (0 × 0).
const FALLBACK_SIZE: WindowSize = WindowSize { rows: 24, cols: 80 };

/// The settings of stdin's terminal from before raw mode, while it is in raw mode.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// The size of stdin's terminal, if it is one and knows its size.
pub(crate) fn size() -> Option<WindowSize> {
    // SAFETY: an all-zero winsize is a valid value for TIOCGWINSZ to overwrite.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize, which lives across the call.
    let r = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some(WindowSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// Puts stdin's terminal back as it was before [`RawMode::enter`], if it is in raw mode.
/// Safe to call from any thread, any number of times.
pub(crate) fn restore() {
    let saved = SAVED.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(termios) = saved {
        // SAFETY: tcsetattr reads one termios, which lives across the call.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSADRAIN, &termios) };
    }
}

/// Stdin's terminal in raw mode until this is dropped (or [`restore`] is called: by the
/// signal thread before it ends kiln, by the panic hook).
pub(crate) struct RawMode(());

impl RawMode {
    pub(crate) fn enter() -> anyhow::Result<RawMode> {
        // SAFETY: an all-zero termios is a valid value for tcgetattr to overwrite.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios, which lives across the call.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut termios) } != 0 {
            return Err(std::io::Error::last_os_error())
                .context("cannot read the terminal's settings");
        }
        *SAVED.lock().unwrap_or_else(PoisonError::into_inner) = Some(termios);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        let mut raw = termios;
        // SAFETY: cfmakeraw only changes the termios it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: tcsetattr reads one termios, which lives across the call.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSADRAIN, &raw) } != 0 {
            let e = std::io::Error::last_os_error();
            restore();
            return Err(e).context("cannot put the terminal in raw mode");
        }
        Ok(RawMode(()))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// Checks that stdin is a terminal, before anything is asked of the guest; `what` names
/// the command in the error.
pub(crate) fn require_terminal(what: &str) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        bail!(
            "{what} needs a terminal on standard input, and it is not one; run `kiln exec` \
             without -t for a command without a terminal (its stdin is then /dev/null)"
        );
    }
    Ok(())
}

/// Runs `req` on a terminal in the guest behind `uds`, driven from this process's
/// terminal (stdin, checked by [`require_terminal`]); returns kiln's exit code (the
/// command's).
pub(crate) fn exec_on_terminal(
    uds: &Path,
    client: &mut Client,
    req: ExecRequest,
) -> anyhow::Result<ExitCode> {
    let stdin = std::io::stdin();
    let asked = size().unwrap_or(FALLBACK_SIZE);
    let mut req = req.tty(asked);
    if !req.env.iter().any(|(k, _)| k == "TERM") {
        if let Ok(term) = std::env::var("TERM") {
            req.env.push(("TERM".into(), term));
        }
    }
    let forwarder = forward_signals(uds.to_owned(), true)?;
    let raw = RawMode::enter()?;
    let mut stdout = std::io::stdout().lock();
    let mut on_started = |s: kiln_agent::protocol::Started, resizer| {
        forwarder.arm_terminal(s.exec_id, resizer, asked);
    };
    let status = client.exec_tty(
        &req,
        TtyIo {
            input: stdin.as_fd(),
            output: &mut stdout,
            on_started: Some(&mut on_started),
        },
    );
    drop(raw);
    Ok(super::exit_code(status.context("exec failed")?))
}
