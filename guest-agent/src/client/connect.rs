//! Reaching the agent through the VMM's hybrid-vsock socket.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use super::{Client, ClientError, Result};
use crate::protocol::Pong;

/// Connects to `uds`, asks for the guest's `port` (`CONNECT <port>\n` → `OK <host port>\n`)
/// and returns the spliced stream.
pub(super) fn handshake(uds: &Path, port: u32, timeout: Option<Duration>) -> Result<UnixStream> {
    let connect_error = |error| ClientError::Connect {
        path: uds.to_owned(),
        error,
    };
    let mut stream = UnixStream::connect(uds).map_err(connect_error)?;
    stream.set_read_timeout(timeout).map_err(connect_error)?;
    stream.set_write_timeout(timeout).map_err(connect_error)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(connect_error)?;
    let answer = read_line(&mut stream).map_err(connect_error)?;
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
    Ok(stream)
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

/// Connects and pings until the agent answers or `timeout` passes: "boot done" seen from
/// the host. Retries every 10 ms; each attempt is bounded by the time left.
pub fn wait_ready(uds: impl AsRef<Path>, port: u32, timeout: Duration) -> Result<Pong> {
    let uds = uds.as_ref();
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt =
            Client::connect_with_timeout(uds, port, Some(left.max(Duration::from_millis(1))))
                .and_then(|mut c| c.ping());
        let last = match attempt {
            Ok(pong) => return Ok(pong),
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
