//! One running exec: its process group, the pump that streams its output, its exit.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use super::spawn::{self, Plan, Stdio};
use super::{pty, Sender, Server};
use crate::protocol::{
    ExecRequest, Frame, Kind, ProtocolError, Started, StdinMode, WindowSize, CHUNK_LEN,
};

/// An exec started on a connection.
pub(super) struct RunningExec {
    pub id: u64,
    pgid: libc::pid_t,
    /// Set (before `Exit` is sent) once the output is drained and the status known.
    done: Arc<AtomicBool>,
    /// The master of the exec's terminal, if it has one.
    terminal: Option<File>,
}

impl RunningExec {
    /// True once the exec has ended and its `Exit` is being or has been sent.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Kills the exec's whole process group, unless it has ended, and the foreground
    /// group of its terminal (a job a shell on it started).
    pub fn kill(&self) {
        if !self.is_done() {
            kill_group(self.pgid);
            if let Some(fg) = self.terminal.as_ref().and_then(pty::foreground) {
                kill_group(fg);
            }
        }
    }

    /// Resizes the exec's terminal. An exec without one is a protocol error; once it has
    /// ended, a resize still in flight is dropped.
    pub fn resize(&self, size: WindowSize) -> Result<(), String> {
        let Some(master) = &self.terminal else {
            return Err(format!(
                "Resize frame, but exec {} has no terminal",
                self.id
            ));
        };
        if !self.is_done() {
            if let Err(e) = pty::set_size(master, size) {
                crate::say!("exec {}: {e}", self.id);
            }
        }
        Ok(())
    }
}

fn kill_group(pgid: libc::pid_t) {
    // SAFETY: killpg only sends a signal; `pgid` is a group this agent created.
    unsafe { libc::killpg(pgid, libc::SIGKILL) };
}

/// What an exec's process gets as stdin, stdout and stderr, and what this side keeps.
struct Wiring {
    /// Descriptors for the child: dropped here once it has its copies.
    child: Vec<OwnedFd>,
    stdio: Stdio,
    /// Where the output comes from: stdout's and stderr's pipes, or the terminal's master
    /// alone.
    output: [Option<File>; 2],
    /// Where `Stdin` frames go (`stdin: pipe` or a terminal).
    stdin: Option<File>,
    /// The terminal's master, for `Resize` and for killing its foreground group.
    terminal: Option<File>,
}

fn io_err(what: &str, e: io::Error) -> String {
    format!("{what}: {e}")
}

/// Pipes: stdout and stderr apart, stdin from `/dev/null` or a pipe fed by `Stdin` frames.
fn pipes(req: &ExecRequest) -> Result<Wiring, String> {
    let (out_r, out_w) = spawn::pipe().map_err(|e| io_err("creating a pipe", e))?;
    let (err_r, err_w) = spawn::pipe().map_err(|e| io_err("creating a pipe", e))?;
    let (stdin_child, stdin_ours): (OwnedFd, Option<File>) = match req.stdin {
        StdinMode::Null => (
            File::open("/dev/null")
                .map_err(|e| io_err("opening /dev/null", e))?
                .into(),
            None,
        ),
        StdinMode::Pipe => {
            let (r, w) = spawn::pipe().map_err(|e| io_err("creating a pipe", e))?;
            (r, Some(File::from(w)))
        }
    };
    let stdio = Stdio {
        stdin: Some(stdin_child.as_raw_fd()),
        stdout: Some(out_w.as_raw_fd()),
        stderr: Some(err_w.as_raw_fd()),
        controlling_tty: false,
    };
    Ok(Wiring {
        child: vec![stdin_child, out_w, err_w],
        stdio,
        output: [Some(File::from(out_r)), Some(File::from(err_r))],
        stdin: stdin_ours,
        terminal: None,
    })
}

/// A new pseudo-terminal of `size`: its slave is all three, its master all this side has.
fn terminal(size: WindowSize) -> Result<Wiring, String> {
    let (master, slave) = pty::open(size).map_err(|e| e.to_string())?;
    let dup = |m: &File| {
        m.try_clone()
            .map_err(|e| io_err("duplicating the terminal", e))
    };
    let fd = slave.as_raw_fd();
    Ok(Wiring {
        stdio: Stdio {
            stdin: Some(fd),
            stdout: Some(fd),
            stderr: Some(fd),
            controlling_tty: true,
        },
        child: vec![slave],
        stdin: Some(dup(&master)?),
        terminal: Some(dup(&master)?),
        output: [Some(master), None],
    })
}

/// Starts `req`: sends `Started`, then streams the output and the `Exit` from a thread of
/// its own. Returns the exec and, for `stdin: pipe` or a terminal, where `Stdin` frames go.
/// The error is for the client (`Error` frame) when the process could not start.
pub(super) fn start(
    server: &Arc<Server>,
    req: &ExecRequest,
    out: &Sender,
) -> Result<(RunningExec, Option<File>), String> {
    let plan = Plan::new(req)?;
    let wiring = match req.tty {
        Some(size) => terminal(size)?,
        None => pipes(req)?,
    };
    let child = plan
        .spawn(wiring.stdio, server.reaper)
        .map_err(|e| e.to_string())?;
    // The child has its copies; the output reaches EOF once every process holding them
    // has gone.
    drop(wiring.child);
    let pgid = child.pid();
    let id = server.next_exec.fetch_add(1, Ordering::Relaxed);
    server.execs().insert(id, pgid);
    if out
        .frame(&Frame::Started(Started {
            exec_id: id,
            pid: pgid,
            tty: wiring.terminal.is_some(),
        }))
        .is_err()
    {
        kill_group(pgid); // the client is gone; the thread below still collects the exec
    }

    let done = Arc::new(AtomicBool::new(false));
    let exec = RunningExec {
        id,
        pgid,
        done: Arc::clone(&done),
        terminal: wiring.terminal,
    };
    let (server2, out2) = (Arc::clone(server), out.clone());
    let finish = move || {
        if pump(wiring.output, &out2).is_err() {
            // Output can no longer reach the client: the exec has no one to serve.
            kill_group(pgid);
        }
        let status = child.wait();
        server2.execs().remove(&id);
        done.store(true, Ordering::Release);
        let _ = match status {
            Ok(status) => out2.frame(&Frame::Exit(status)),
            Err(e) => out2.error(&format!("waiting for exec {id}: {e}")),
        };
    };
    if let Err(e) = thread::Builder::new()
        .name(format!("exec-{id}"))
        .spawn(finish)
    {
        // `finish` was dropped with the pipes; the reaper collects the killed group.
        kill_group(pgid);
        server.execs().remove(&id);
        return Err(format!("starting a thread for exec {id}: {e}"));
    }
    Ok((exec, wiring.stdin))
}

/// Streams stdout and stderr to the client as they come until both reach EOF (a terminal's
/// master: until every holder of its slave has gone, when reading it fails with EIO). Fails
/// only when sending to the client fails.
fn pump(mut open: [Option<File>; 2], out: &Sender) -> Result<(), ProtocolError> {
    const KINDS: [Kind; 2] = [Kind::Stdout, Kind::Stderr];
    let mut buf = vec![0u8; CHUNK_LEN];
    while open.iter().any(Option::is_some) {
        let fds = open
            .each_ref()
            .map(|p| p.as_ref().map_or(-1, AsRawFd::as_raw_fd));
        let ready = match crate::poll::readable(fds) {
            Ok(ready) => ready,
            Err(e) => {
                crate::say!("polling exec output: {e}");
                return Ok(());
            }
        };
        for ((pipe, ready), kind) in open.iter_mut().zip(ready).zip(KINDS) {
            let Some(file) = pipe.as_mut().filter(|_| ready) else {
                continue;
            };
            match file.read(&mut buf) {
                Ok(0) => *pipe = None,
                Err(e) if e.raw_os_error() == Some(libc::EIO) => *pipe = None,
                Ok(n) => out.raw(kind, &buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    crate::say!("reading exec {kind}: {e}");
                    *pipe = None;
                }
            }
        }
    }
    Ok(())
}
