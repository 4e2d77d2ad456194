//! The client's half of an exec: output in, stdin out on a second thread.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use super::{ClientError, ExecIo, Result};
use crate::protocol::{
    read_frame, write_frame, write_raw, ExecRequest, ExitStatus, Frame, Kind, Started, StdinMode,
    CHUNK_LEN,
};

/// Sends `req` and streams the exec through `io`.
pub(super) fn run(
    stream: &mut UnixStream,
    req: &ExecRequest,
    io: ExecIo<'_>,
) -> Result<ExitStatus> {
    write_frame(stream, &Frame::Exec(req.clone()))?;
    let ExecIo {
        stdin,
        stdout,
        stderr,
        mut on_started,
    } = io;
    let mut started = |s: Started| {
        if let Some(f) = on_started.as_mut() {
            f(s);
        }
    };
    let Some(source) = stdin.filter(|_| req.stdin == StdinMode::Pipe) else {
        if req.stdin == StdinMode::Pipe {
            write_frame(stream, &Frame::StdinEof)?;
        }
        return output(stream, &mut streams(stdout, stderr), &mut started);
    };
    let feed_stream = stream.try_clone().map_err(|error| ClientError::Local {
        what: "duplicating the agent connection for stdin",
        error,
    })?;
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        let feeder = scope.spawn(|| feed(source, feed_stream, &stop));
        let result = output(stream, &mut streams(stdout, stderr), &mut started);
        stop.store(true, Ordering::Release);
        if result.is_err() {
            // The conversation is over: make the feeder's next write fail.
            let _ = stream.shutdown(Shutdown::Both);
        }
        let fed = feeder
            .join()
            .unwrap_or(Err(ClientError::Usage("the stdin thread panicked")));
        match (result, fed) {
            (Err(e), _) => Err(e),
            (Ok(status), Ok(())) => Ok(status),
            // The process ran; its stdin was cut short by the local source.
            (Ok(_), Err(e @ ClientError::Local { .. })) => Err(e),
            // The process ended; the stdin stream did not finish: report the status, but
            // the connection is out of step.
            (Ok(status), Err(_)) => {
                let _ = stream.shutdown(Shutdown::Both);
                Ok(status)
            }
        }
    })
}

/// A sink for [`output`] that writes `Stdout` to `stdout` and `Stderr` to `stderr`.
fn streams<'a>(
    stdout: &'a mut dyn Write,
    stderr: &'a mut dyn Write,
) -> impl FnMut(Kind, &[u8]) -> Result<()> + 'a {
    move |kind, bytes| match kind {
        Kind::Stderr => pass(stderr, bytes, "writing the exec's stderr"),
        _ => pass(stdout, bytes, "writing the exec's stdout"),
    }
}

/// Reads frames until `Exit`, passing output (`Stdout` or `Stderr`, with its bytes) to
/// `sink` as it comes.
pub(super) fn output(
    stream: &mut UnixStream,
    sink: &mut dyn FnMut(Kind, &[u8]) -> Result<()>,
    started: &mut dyn FnMut(Started),
) -> Result<ExitStatus> {
    loop {
        let frame = read_frame(stream)?.ok_or(ClientError::Closed("the exec's Exit"))?;
        match frame {
            Frame::Started(s) => started(s),
            Frame::Stdout(bytes) => sink(Kind::Stdout, &bytes)?,
            Frame::Stderr(bytes) => sink(Kind::Stderr, &bytes)?,
            Frame::Exit(status) => return Ok(status),
            Frame::Error(e) => return Err(ClientError::Remote(e.message)),
            other => {
                return Err(ClientError::Unexpected {
                    got: other.kind(),
                    expected: "exec output",
                })
            }
        }
    }
}

pub(super) fn pass(sink: &mut dyn Write, bytes: &[u8], what: &'static str) -> Result<()> {
    sink.write_all(bytes)
        .and_then(|()| sink.flush())
        .map_err(|error| ClientError::Local { what, error })
}

/// Sends `source` as `Stdin` frames, then `StdinEof`. Stops early once `stop` is set (the
/// exec ended). A local read error ends stdin (`StdinEof`) and is returned.
fn feed(source: &mut (dyn Read + Send), mut sink: UnixStream, stop: &AtomicBool) -> Result<()> {
    let mut buf = vec![0u8; CHUNK_LEN];
    let mut local = Ok(());
    while !stop.load(Ordering::Acquire) {
        match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => write_raw(&mut sink, Kind::Stdin, &buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                local = Err(ClientError::Local {
                    what: "reading the exec's stdin",
                    error,
                });
                break;
            }
        }
    }
    write_frame(&mut sink, &Frame::StdinEof)?;
    local
}
