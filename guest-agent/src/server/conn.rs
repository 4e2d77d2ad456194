//! One connection: reads requests one after another and answers them.
//!
//! An exec runs in the background (its thread sends the output and the `Exit`) while this
//! loop keeps reading, so that it can feed `Stdin` frames to the process and notice at once
//! when the client goes away, which kills the exec's process group.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::Arc;

use super::exec::{self, RunningExec};
use super::{files, uptime_ms, ConnectionError, Sender, Server};
use crate::protocol::{read_frame, Frame, Pong, VERSION};

/// The standard input of the connection's latest exec.
enum Stdin {
    /// No exec with `stdin: pipe` is expecting input: a `Stdin` frame is an error.
    Closed,
    /// The client may send `Stdin` until `StdinEof`; `None` once the process cannot take
    /// more (it ended or closed its end), when the bytes are dropped.
    Open(Option<File>),
}

struct Conn<'a> {
    server: &'a Arc<Server>,
    out: Sender,
    exec: Option<RunningExec>,
    stdin: Stdin,
}

/// Serves requests until the client closes the connection or breaks the protocol.
pub(super) fn serve(
    server: &Arc<Server>,
    id: u64,
    mut reader: impl Read,
    out: Sender,
) -> Result<(), ConnectionError> {
    let mut conn = Conn {
        server,
        out,
        exec: None,
        stdin: Stdin::Closed,
    };
    let result = loop {
        match read_frame(&mut reader) {
            Ok(Some(frame)) => {
                if let Err(e) = conn.handle(frame, &mut reader) {
                    break Err(e);
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.into()),
        }
    };
    if let Some(exec) = conn.exec.as_ref().filter(|e| !e.is_done()) {
        crate::say!(
            "connection {id}: killing exec {} (connection closed)",
            exec.id
        );
        exec.kill();
    }
    if let Err(e) = &result {
        // Best effort: the client may be gone already.
        let _ = conn.out.error(&e.to_string());
    }
    result
}

impl Conn<'_> {
    fn handle(&mut self, frame: Frame, reader: &mut dyn Read) -> Result<(), ConnectionError> {
        match frame {
            Frame::Stdin(bytes) => return self.stdin(&bytes),
            Frame::Resize(size) => {
                let Some(exec) = &self.exec else {
                    return Err(unexpected(
                        "Resize frame, but no exec runs on this connection",
                    ));
                };
                return exec.resize(size).map_err(ConnectionError::Unexpected);
            }
            Frame::StdinEof => {
                if matches!(self.stdin, Stdin::Closed) {
                    return Err(unexpected("StdinEof frame, but no exec is taking stdin"));
                }
                self.stdin = Stdin::Closed; // drops the pipe: the process reads EOF
                return Ok(());
            }
            _ => {}
        }
        if let Some(exec) = self.exec.as_ref().filter(|e| !e.is_done()) {
            return Err(ConnectionError::Unexpected(format!(
                "{} request while exec {} is running on this connection; open another \
                 connection for it",
                frame.kind(),
                exec.id
            )));
        }
        self.exec = None;
        self.stdin = Stdin::Closed;
        let server = self.server;
        match frame {
            Frame::Exec(req) => match exec::start(server, &req, &self.out) {
                Ok((exec, pipe)) => {
                    self.exec = Some(exec);
                    if let Some(pipe) = pipe {
                        self.stdin = Stdin::Open(Some(pipe));
                    }
                }
                Err(message) => self.out.error(&message)?,
            },
            Frame::Signal(req) => self.answer(server.signal(&req))?,
            Frame::PutFile(req) => files::put(&req, reader, &self.out)?,
            Frame::GetFile(req) => files::get(&req, &self.out)?,
            Frame::Ping => self.out.frame(&Frame::Pong(Pong {
                version: VERSION,
                agent: env!("CARGO_PKG_VERSION").into(),
                uptime_ms: uptime_ms(),
            }))?,
            Frame::SetTime(t) => {
                let r = server.system.set_time(t.unix_nanos);
                self.answer(r.map_err(|e| format!("setting the clock: {e}")))?;
            }
            Frame::AddEntropy(bytes) => {
                let r = server.system.add_entropy(&bytes);
                self.answer(r.map_err(|e| format!("adding entropy: {e}")))?;
            }
            Frame::Shutdown => {
                self.out.frame(&Frame::Ok)?;
                if let Err(e) = server.system.shutdown() {
                    crate::say!("shutting down: {e}");
                }
            }
            other => {
                return Err(ConnectionError::Unexpected(format!(
                    "{} frame from the client; it is not a request",
                    other.kind()
                )))
            }
        }
        Ok(())
    }

    /// Feeds `bytes` to the exec's stdin, or drops them if the process can take no more.
    fn stdin(&mut self, bytes: &[u8]) -> Result<(), ConnectionError> {
        let exec_done = self.exec.as_ref().is_none_or(RunningExec::is_done);
        let Stdin::Open(pipe) = &mut self.stdin else {
            return Err(unexpected("Stdin frame, but no exec is taking stdin"));
        };
        if exec_done {
            // A process left behind by the exec may hold the pipe without reading it.
            *pipe = None;
        }
        if let Some(file) = pipe {
            match file.write_all(bytes) {
                Ok(()) => {}
                // The process closed its stdin or ended: drop the rest, as a pipe would.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => *pipe = None,
                Err(e) => {
                    crate::say!("writing to an exec's stdin: {e}");
                    *pipe = None;
                }
            }
        }
        Ok(())
    }

    fn answer(&self, result: Result<(), String>) -> Result<(), ConnectionError> {
        match result {
            Ok(()) => self.out.frame(&Frame::Ok)?,
            Err(message) => self.out.error(&message)?,
        }
        Ok(())
    }
}

fn unexpected(what: &str) -> ConnectionError {
    ConnectionError::Unexpected(what.into())
}
