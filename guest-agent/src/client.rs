//! The host side: talks to the guest agent through the VM's hybrid-vsock Unix socket.
//!
//! Plain blocking std I/O. One [`Client`] is one connection and carries one request at a
//! time; open another client to cancel an exec from another thread ([`Client::signal`]).
//!
//! ```no_run
//! use kiln_agent::client::Client;
//! use kiln_agent::protocol::{ExecRequest, AGENT_PORT};
//!
//! let mut client = Client::connect_unix("/run/kiln/vm1.vsock", AGENT_PORT)?;
//! let req = ExecRequest::new(["sh", "-c", "echo hello; exit 3"]).env("CI", "true");
//! let status = client.exec(&req, &mut std::io::stdout(), &mut std::io::stderr())?;
//! assert_eq!(status.shell_code(), 3);
//! # Ok::<(), kiln_agent::client::ClientError>(())
//! ```

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::protocol::{
    read_frame, write_frame, write_raw, ExecRequest, ExitStatus, FileInfo, Frame, GetFile, Kind,
    Pong, ProtocolError, PutFile, SetTime, SignalRequest, SignalTarget, Started, StdinMode,
    CHUNK_LEN,
};

mod connect;
mod error;
mod exec;
mod tty;

pub use connect::{connect_ready, wait_ready, ATTEMPT_TIMEOUT, HANDSHAKE_TIMEOUT};
pub use error::ClientError;
pub use tty::{Resizer, TtyIo};

/// The result of client calls.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// The streams and callback of [`Client::exec_with`].
pub struct ExecIo<'a> {
    /// Fed to the process as stdin (requires `stdin: pipe` in the request). It is read on
    /// another thread until EOF, or until the exec has ended; a read that blocks (a
    /// terminal) delays the call's return until it comes back.
    pub stdin: Option<&'a mut (dyn Read + Send)>,
    /// Receives stdout as it arrives (flushed after each chunk).
    pub stdout: &'a mut dyn Write,
    /// Receives stderr as it arrives (flushed after each chunk).
    pub stderr: &'a mut dyn Write,
    /// Called with the exec id and pid once the process runs, e.g. to hand them to a
    /// thread that may cancel it with [`Client::signal`] on another connection.
    pub on_started: Option<&'a mut dyn FnMut(Started)>,
}

/// A connection to the guest agent.
pub struct Client {
    stream: UnixStream,
    broken: bool,
}

impl Client {
    /// Connects to the VM's hybrid-vsock Unix socket and asks for the guest's `port`
    /// (`CONNECT <port>\n` → `OK <host port>\n`). The answer must come within
    /// [`HANDSHAKE_TIMEOUT`] (else [`ClientError::HandshakeTimeout`]); the connection then
    /// has no timeouts. See [`connect_ready`] for a connection that retries.
    pub fn connect_unix(uds: impl AsRef<Path>, port: u32) -> Result<Client> {
        Self::connect_with_timeout(uds.as_ref(), port, None)
    }

    /// [`Client::connect_unix`] with read and write timeouts on the connection. The
    /// handshake is bounded by `timeout`, or by [`HANDSHAKE_TIMEOUT`] if it is `None`.
    pub fn connect_with_timeout(
        uds: &Path,
        port: u32,
        timeout: Option<Duration>,
    ) -> Result<Client> {
        Self::connect_with_timeouts(uds, port, timeout.unwrap_or(HANDSHAKE_TIMEOUT), timeout)
    }

    /// Connects with the handshake bounded by `handshake` and `timeout` as the read and
    /// write timeouts of the connection afterwards (`None`: block).
    pub fn connect_with_timeouts(
        uds: &Path,
        port: u32,
        handshake: Duration,
        timeout: Option<Duration>,
    ) -> Result<Client> {
        connect::handshake(uds, port, handshake, timeout).map(Client::from_stream)
    }

    /// A client on a stream that already reaches the agent (tests, or a socket spliced by
    /// other means).
    pub fn from_stream(stream: UnixStream) -> Client {
        Client {
            stream,
            broken: false,
        }
    }

    /// Sets read and write timeouts on the connection (`None`: block).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)?;
        self.stream.set_write_timeout(timeout)
    }

    /// Checks that the agent answers; returns its version and the guest's uptime.
    pub fn ping(&mut self) -> Result<Pong> {
        self.request(|c| {
            c.send(&Frame::Ping)?;
            match c.recv("Pong")? {
                Frame::Pong(p) => Ok(p),
                other => Err(unexpected(other, "Pong")),
            }
        })
    }

    /// Runs `req`, streaming its output into `stdout` and `stderr` as it arrives; returns
    /// how the process ended. With `stdin: pipe` the process reads an empty stdin; use
    /// [`Client::exec_with`] to feed it, or to learn the exec id for a cancel.
    pub fn exec(
        &mut self,
        req: &ExecRequest,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<ExitStatus> {
        self.exec_with(
            req,
            ExecIo {
                stdin: None,
                stdout,
                stderr,
                on_started: None,
            },
        )
    }

    /// Runs `req` with stdin, output sinks and a start callback (see [`ExecIo`]). With
    /// `stdin: pipe` and no `io.stdin`, the process gets an empty stdin.
    pub fn exec_with(&mut self, req: &ExecRequest, io: ExecIo<'_>) -> Result<ExitStatus> {
        if io.stdin.is_some() && req.stdin != StdinMode::Pipe {
            return Err(ClientError::Usage(
                "exec_with was given stdin, but the request's stdin is not `pipe`",
            ));
        }
        self.request(|c| exec::run(&mut c.stream, req, io))
    }

    /// Runs `req` on a pseudo-terminal in the guest (the request must ask for one:
    /// [`ExecRequest::tty`]): what `io.input` gives is typed into it, its output goes to
    /// `io.output`, and `io.on_started` gets a [`Resizer`] for its size. Returns how the
    /// process ended; [`ClientError::NoTerminal`] if the agent cannot give it a terminal.
    pub fn exec_tty(&mut self, req: &ExecRequest, io: TtyIo<'_>) -> Result<ExitStatus> {
        if req.tty.is_none() || req.stdin != StdinMode::Pipe {
            return Err(ClientError::Usage(
                "exec_tty needs a request with a terminal and `stdin: pipe` (ExecRequest::tty)",
            ));
        }
        self.request(|c| tty::run(&mut c.stream, req, io))
    }

    /// Sends `signo` to an exec's process group or to a pid.
    pub fn signal(&mut self, target: SignalTarget, signo: i32) -> Result<()> {
        self.simple(Frame::Signal(SignalRequest { target, signo }))
    }

    /// Writes `data` to the guest file `path` (absolute; its directory must exist) with
    /// permission bits `mode`, replacing it whole. Returns the bytes sent.
    pub fn put_file(&mut self, path: &str, mode: u32, data: &mut dyn Read) -> Result<u64> {
        self.request(|c| {
            c.send(&Frame::PutFile(PutFile {
                path: path.into(),
                mode,
            }))?;
            let mut buf = vec![0u8; CHUNK_LEN];
            let mut sent = 0u64;
            loop {
                let n = match data.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(error) => {
                        // The upload cannot be finished or aborted in-band: closing the
                        // connection makes the agent discard it.
                        let _ = c.stream.shutdown(Shutdown::Both);
                        let what = "reading the data to send";
                        return Err(ClientError::Local { what, error });
                    }
                };
                write_raw(&mut c.stream, Kind::Data, &buf[..n])?;
                sent += n as u64;
            }
            c.send(&Frame::DataEnd)?;
            c.expect_ok().map(|()| sent)
        })
    }

    /// Reads the guest file `path` (absolute) into `out`; returns its size and mode.
    pub fn get_file(&mut self, path: &str, out: &mut dyn Write) -> Result<FileInfo> {
        self.request(|c| {
            c.send(&Frame::GetFile(GetFile { path: path.into() }))?;
            let info = match c.recv("FileInfo")? {
                Frame::FileInfo(info) => info,
                Frame::Error(e) => return Err(ClientError::Remote(e.message)),
                other => return Err(unexpected(other, "FileInfo")),
            };
            // After a local write error, keep reading to the end so that the connection
            // stays in step, then report it.
            let mut local = None;
            loop {
                match c.recv("file data")? {
                    Frame::Data(bytes) if local.is_none() => {
                        local = out.write_all(&bytes).err();
                    }
                    Frame::Data(_) => {}
                    Frame::DataEnd => break,
                    Frame::Error(e) => return Err(ClientError::Remote(e.message)),
                    other => return Err(unexpected(other, "file data")),
                }
            }
            match local.map_or_else(|| out.flush().err(), Some) {
                None => Ok(info),
                Some(error) => {
                    let what = "writing the received file";
                    Err(ClientError::Local { what, error })
                }
            }
        })
    }

    /// Sets the guest's wall clock to `time`.
    pub fn set_time(&mut self, time: SystemTime) -> Result<()> {
        let since_epoch = time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| ClientError::Usage("set_time: the time is before 1970"))?;
        let unix_nanos = u64::try_from(since_epoch.as_nanos())
            .map_err(|_| ClientError::Usage("set_time: the time is after 2554"))?;
        self.simple(Frame::SetTime(SetTime { unix_nanos }))
    }

    /// Adds `bytes` to the guest kernel's entropy pool (credited as full entropy).
    pub fn add_entropy(&mut self, bytes: &[u8]) -> Result<()> {
        self.simple(Frame::AddEntropy(bytes.to_vec()))
    }

    /// Asks the agent to sync and reboot the guest, which ends the VM. Succeeds when the
    /// agent acknowledges, or when the connection ends first (the guest went down).
    pub fn shutdown(&mut self) -> Result<()> {
        let result = self.request(|c| {
            c.send(&Frame::Shutdown)?;
            match read_frame(&mut c.stream) {
                Ok(Some(Frame::Ok) | None) => Ok(()),
                Err(ProtocolError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
                Ok(Some(Frame::Error(e))) => Err(ClientError::Remote(e.message)),
                Ok(Some(other)) => Err(unexpected(other, "Ok")),
                Err(e) => Err(e.into()),
            }
        });
        self.broken = true; // the guest is going away
        result
    }

    /// Runs one request; an error that may leave the conversation out of step marks the
    /// client broken.
    fn request<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        let result = f(self);
        if let Err(e) = &result {
            self.broken |= !e.keeps_connection();
        }
        result
    }

    /// A request answered by `Ok` or `Error`.
    fn simple(&mut self, frame: Frame) -> Result<()> {
        self.request(|c| {
            c.send(&frame)?;
            c.expect_ok()
        })
    }

    fn send(&mut self, frame: &Frame) -> Result<()> {
        Ok(write_frame(&mut self.stream, frame)?)
    }

    fn recv(&mut self, expected: &'static str) -> Result<Frame> {
        read_frame(&mut self.stream)?.ok_or(ClientError::Closed(expected))
    }

    fn expect_ok(&mut self) -> Result<()> {
        match self.recv("Ok")? {
            Frame::Ok => Ok(()),
            Frame::Error(e) => Err(ClientError::Remote(e.message)),
            other => Err(unexpected(other, "Ok")),
        }
    }
}

fn unexpected(frame: Frame, expected: &'static str) -> ClientError {
    match frame {
        Frame::Error(e) => ClientError::Remote(e.message),
        other => ClientError::Unexpected {
            got: other.kind(),
            expected,
        },
    }
}
