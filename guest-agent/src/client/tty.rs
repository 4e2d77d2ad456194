//! The client's half of an exec on a terminal: output in, keystrokes and resizes out.
//!
//! Keystrokes come from a descriptor that is polled together with a stop channel, so a
//! terminal nobody types on never holds up the end of the exec. Keystrokes and resizes
//! share the connection's writing half under one lock, one whole frame at a time, and
//! neither is sent once the exec's `Exit` has arrived.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use super::exec::{output, pass};
use super::{ClientError, Result};
use crate::protocol::{
    read_frame, write_frame, write_raw, ExecRequest, ExitStatus, Frame, Kind, Started, WindowSize,
    CHUNK_LEN,
};

/// The streams and callback of [`Client::exec_tty`](super::Client::exec_tty).
pub struct TtyIo<'a> {
    /// What is typed: read as it comes and sent as keystrokes until the exec ends (never
    /// read after that). Its end of file, or an error reading it, ends input (`StdinEof`).
    pub input: BorrowedFd<'a>,
    /// Receives the terminal's output as it arrives (flushed after each chunk).
    pub output: &'a mut dyn io::Write,
    /// Called once the process runs on its terminal, with a [`Resizer`] for it (for
    /// example for a SIGWINCH handler's thread).
    pub on_started: Option<&'a mut dyn FnMut(Started, Resizer)>,
}

/// The connection's writing half while the exec runs; `None` once it has ended.
type Writer = Arc<Mutex<Option<UnixStream>>>;

fn lock(writer: &Writer) -> std::sync::MutexGuard<'_, Option<UnixStream>> {
    writer.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Changes the size of a running exec's terminal.
#[derive(Clone)]
pub struct Resizer(Writer);

impl Resizer {
    /// Sends the terminal's new size; does nothing once the exec has ended.
    pub fn resize(&self, size: WindowSize) -> Result<()> {
        match lock(&self.0).as_mut() {
            Some(stream) => Ok(write_frame(stream, &Frame::Resize(size))?),
            None => Ok(()),
        }
    }
}

/// Sends `req` (which asks for a terminal) and runs the exec through `io`.
pub(super) fn run(stream: &mut UnixStream, req: &ExecRequest, io: TtyIo<'_>) -> Result<ExitStatus> {
    write_frame(stream, &Frame::Exec(req.clone()))?;
    let started = match read_frame(stream)?.ok_or(ClientError::Closed("Started"))? {
        Frame::Started(s) => s,
        Frame::Error(e) => return Err(ClientError::Remote(e.message)),
        other => {
            return Err(ClientError::Unexpected {
                got: other.kind(),
                expected: "Started",
            })
        }
    };
    if !started.tty {
        // The process runs on pipes, which is not what was asked: closing the connection
        // makes the agent kill it.
        let _ = stream.shutdown(Shutdown::Both);
        return Err(ClientError::NoTerminal);
    }
    let local = |what| move |error| ClientError::Local { what, error };
    let writer: Writer = Arc::new(Mutex::new(Some(
        stream
            .try_clone()
            .map_err(local("duplicating the agent connection for input"))?,
    )));
    let (stop, stopped) = UnixStream::pair().map_err(local("creating a stop channel"))?;
    let TtyIo {
        input,
        output: sink,
        on_started,
    } = io;
    thread::scope(|scope| {
        let feeder = scope.spawn(|| feed(input, &writer, &stopped));
        if let Some(f) = on_started {
            f(started, Resizer(Arc::clone(&writer)));
        }
        let mut to_sink =
            |_: Kind, bytes: &[u8]| pass(sink, bytes, "writing the terminal's output");
        let result = output(stream, &mut to_sink, &mut |_| {});
        // No keystroke or resize after `Exit`: the connection may carry the next request.
        *lock(&writer) = None;
        drop(stop);
        if result.is_err() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let fed = feeder
            .join()
            .unwrap_or(Err(ClientError::Usage("the input thread panicked")));
        match (result, fed) {
            (Err(e), _) => Err(e),
            (Ok(status), Ok(())) => Ok(status),
            // The process ran; what was typed could not all be sent.
            (Ok(status), Err(_)) => {
                let _ = stream.shutdown(Shutdown::Both);
                Ok(status)
            }
        }
    })
}

/// Sends what `input` gives as `Stdin` frames until it ends (then `StdinEof`) or `stopped`
/// wakes (the exec ended).
fn feed(input: BorrowedFd<'_>, writer: &Writer, stopped: &UnixStream) -> Result<()> {
    let mut buf = vec![0u8; CHUNK_LEN];
    loop {
        let [typed, stop] = crate::poll::readable([input.as_raw_fd(), stopped.as_raw_fd()])
            .map_err(|error| ClientError::Local {
                what: "waiting for input",
                error,
            })?;
        if stop {
            return Ok(()); // the exec ended: the other end was dropped
        }
        if !typed {
            continue;
        }
        // SAFETY: reads into `buf`, which is valid for `buf.len()` bytes.
        let n = unsafe { libc::read(input.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            // End of input, or a terminal that went away (EIO): no more keystrokes.
            return match lock(writer).as_mut() {
                Some(stream) => Ok(write_frame(stream, &Frame::StdinEof)?),
                None => Ok(()),
            };
        }
        let n = n.unsigned_abs();
        match lock(writer).as_mut() {
            Some(stream) => write_raw(stream, Kind::Stdin, &buf[..n])?,
            None => return Ok(()),
        }
    }
}
