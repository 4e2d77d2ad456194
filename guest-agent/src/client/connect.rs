//! Reaching the agent through the VMM's hybrid-vsock socket.
//!
//! Right after a snapshot restore the vsock device sends the guest a transport reset. A
//! host connection made before the guest has handled it is dropped by the guest without a
//! word to the host: the `CONNECT` gets no answer, or the connection ends before the first
//! request is answered. Hence the bounded handshake ([`HANDSHAKE_TIMEOUT`]), the bounded
//! attempts of [`wait_ready`] and the retrying [`connect_ready`].

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use super::{Client, ClientError, Result};
use crate::protocol::{Pong, ProtocolError};

/// How long [`Client::connect_unix`] waits for the VMM's answer to `CONNECT <port>`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one attempt of [`wait_ready`] and [`connect_ready`] (connect, handshake and
/// ping) may take before it is abandoned and retried.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Connects to `uds`, asks for the guest's `port` (`CONNECT <port>\n` → `OK <host port>\n`)
/// within `handshake_timeout`, and returns the spliced stream with `io_timeout` as its read
/// and write timeouts.
pub(super) fn handshake(
    uds: &Path,
    port: u32,
    handshake_timeout: Duration,
    io_timeout: Option<Duration>,
) -> Result<UnixStream> {
    let connect_error = |error| ClientError::Connect {
        path: uds.to_owned(),
        error,
    };
    let handshake_timeout = handshake_timeout.max(Duration::from_millis(1));
    let timed_out = || ClientError::HandshakeTimeout {
        path: uds.to_owned(),
        port,
        timeout: handshake_timeout,
    };
    let mut stream = UnixStream::connect(uds).map_err(connect_error)?;
    stream
        .set_read_timeout(Some(handshake_timeout))
        .map_err(connect_error)?;
    stream
        .set_write_timeout(Some(handshake_timeout))
        .map_err(connect_error)?;
    match stream.write_all(format!("CONNECT {port}\n").as_bytes()) {
        Ok(()) => {}
        Err(e) if is_timeout(&e) => return Err(timed_out()),
        Err(e) => return Err(connect_error(e)),
    }
    let answer = match read_line(&mut stream) {
        Ok(answer) => answer,
        Err(e) if is_timeout(&e) => return Err(timed_out()),
        Err(e) => return Err(connect_error(e)),
    };
    let accepted = answer
        .strip_prefix("OK ")
        .and_then(|p| p.strip_suffix('\n'))
        .is_some_and(|p| p.parse::<u32>().is_ok());
    if !accepted {
        return Err(ClientError::Refused {
            path: uds.to_owned(),
            port,
            answer,
        });
    }
    stream.set_read_timeout(io_timeout).map_err(connect_error)?;
    stream
        .set_write_timeout(io_timeout)
        .map_err(connect_error)?;
    Ok(stream)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads one handshake line, byte by byte so that nothing after it is consumed.
fn read_line(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8];
    while line.len() < 64 && line.last() != Some(&b'\n') {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// One bounded attempt: connect, handshake and ping within `timeout`.
fn attempt(uds: &Path, port: u32, timeout: Duration) -> Result<(Client, Pong)> {
    let timeout = timeout.max(Duration::from_millis(1));
    let mut client = Client::connect_with_timeout(uds, port, Some(timeout))?;
    let pong = client.ping()?;
    Ok((client, pong))
}

/// Connects and pings until the agent answers or `timeout` passes: "boot done" seen from
/// the host. Each attempt (connect, handshake, ping) is bounded by [`ATTEMPT_TIMEOUT`] (and
/// by the time left), so a connection the guest dropped silently is abandoned and retried;
/// failed attempts are retried every 10 ms.
pub fn wait_ready(uds: impl AsRef<Path>, port: u32, timeout: Duration) -> Result<Pong> {
    let uds = uds.as_ref();
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let last = match attempt(uds, port, left.min(ATTEMPT_TIMEOUT)) {
            Ok((_, pong)) => return Ok(pong),
            Err(e) => e.to_string(),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::NotReady {
                path: uds.to_owned(),
                port,
                timeout,
                last,
            });
        }
        // Polling interval between attempts, not a synchronization.
        thread::sleep(left.min(Duration::from_millis(10)));
    }
}

/// A connection on which the agent has answered a ping, for a request that must not be
/// sent twice (an exec, a file upload). Connect, handshake and ping are retried within
/// `total`, each attempt bounded by [`ATTEMPT_TIMEOUT`], while they fail the way a
/// connection made too early after a snapshot restore fails (no answer to `CONNECT`, or the
/// connection ends or times out before the ping is answered). Nothing but the ping is ever
/// sent on an abandoned connection, so the caller's request runs at most once. The returned
/// client has no timeouts (an exec may be silent for hours).
///
/// Errors that a retry would not cure (no socket, a refused port, a protocol mismatch) are
/// returned at once.
pub fn connect_ready(uds: impl AsRef<Path>, port: u32, total: Duration) -> Result<Client> {
    let uds = uds.as_ref();
    let deadline = Instant::now() + total;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match attempt(uds, port, left.min(ATTEMPT_TIMEOUT)) {
            Ok((client, _)) => {
                client
                    .set_timeout(None)
                    .map_err(|error| ClientError::Local {
                        what: "clearing the agent connection's timeouts",
                        error,
                    })?;
                return Ok(client);
            }
            Err(e) if !is_early_drop(&e) => return Err(e),
            Err(e) if deadline.saturating_duration_since(Instant::now()).is_zero() => {
                return Err(e)
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// True for the failures of a connection the guest dropped before answering anything.
fn is_early_drop(e: &ClientError) -> bool {
    match e {
        ClientError::HandshakeTimeout { .. } | ClientError::Closed(_) => true,
        // The VMM closed the connection without answering CONNECT.
        ClientError::Refused { answer, .. } => answer.is_empty(),
        ClientError::Protocol(ProtocolError::Io(_) | ProtocolError::Truncated { .. }) => true,
        _ => false,
    }
}
