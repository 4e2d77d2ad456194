//! The host end: the Unix listener, the `CONNECT <port>` handshake, and non-blocking
//! connects to `P_N` for guest-initiated connections.

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::VsockError;

/// Longest `CONNECT` line accepted, newline excluded ("CONNECT 4294967295" is 18 bytes).
pub(crate) const MAX_CONNECT_LINE: usize = 32;

/// How long a host client has to send its `CONNECT` line before it is dropped.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Bind the device's listening socket, non-blocking, mode 0600 (see [`crate::private`]).
pub(crate) fn bind_listener(path: &Path) -> Result<UnixListener, VsockError> {
    let bind_err = |source| VsockError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = crate::private::bind_socket(path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

/// The Unix socket a guest connection to host port `port` goes to: `P_port`.
pub(crate) fn host_port_path(base: &Path, port: u32) -> PathBuf {
    let mut s = OsString::from(base.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// How far a host client's `CONNECT` line has come.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Handshake {
    /// No full line yet.
    Pending,
    /// The client asked for this guest port.
    Connect(u32),
    /// The client closed, sent garbage or too much: drop it. The reason is for the log.
    Refused(&'static str),
}

/// A host client that has connected but not yet sent its `CONNECT` line.
#[derive(Debug)]
pub(crate) struct PendingClient {
    pub(crate) stream: UnixStream,
    line: Vec<u8>,
    /// When it connected: past [`HANDSHAKE_TIMEOUT`] without a full line, it is dropped.
    since: Instant,
}

impl PendingClient {
    pub(crate) fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            line: Vec::with_capacity(MAX_CONNECT_LINE),
            since: Instant::now(),
        }
    }

    /// Whether the client has had longer than `timeout` to send its line, at `now`.
    pub(crate) fn expired(&self, now: Instant, timeout: Duration) -> bool {
        now.saturating_duration_since(self.since) > timeout
    }

    /// Read what the client sent so far. Reads one byte at a time so that nothing after the
    /// newline (the start of the client's payload) is consumed here.
    pub(crate) fn poll(&mut self) -> Handshake {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return Handshake::Refused("client closed before its CONNECT line"),
                Ok(_) if byte[0] == b'\n' => return parse_connect(&self.line),
                Ok(_) if self.line.len() >= MAX_CONNECT_LINE => {
                    return Handshake::Refused("CONNECT line too long")
                }
                Ok(_) => self.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Handshake::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Handshake::Refused("read error on the client socket"),
            }
        }
    }
}

/// Parse `CONNECT <port>` (a trailing `\r` is tolerated).
pub(crate) fn parse_connect(line: &[u8]) -> Handshake {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(digits) = line.strip_prefix(b"CONNECT ") else {
        return Handshake::Refused("line does not start with \"CONNECT \"");
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Handshake::Refused("CONNECT port is not a decimal number");
    }
    match std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(port) => Handshake::Connect(port),
        None => Handshake::Refused("CONNECT port does not fit 32 bits"),
    }
}

/// Connect to the Unix socket at `path` without ever blocking: a listener whose backlog is
/// full gives `WouldBlock` instead of stalling the event loop. The stream is non-blocking.
pub(crate) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or_default(),
        sun_path: [0; 108],
    };
    // Keep room for the terminating NUL.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or contains NUL",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>())
        .map_err(|_| io::Error::other("sockaddr_un size"))?;
    // SAFETY: `addr` is an initialised sockaddr_un that lives across the call, `len` is its
    // size, and `sock` is an open socket.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(sock))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Handshake::Connect(1024));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Handshake::Connect(52));
        assert_eq!(
            parse_connect(b"CONNECT 4294967295"),
            Handshake::Connect(u32::MAX)
        );
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT ",
            b"CONNECT +5",
            b"CONNECT -1",
            b"CONNECT 5 6",
            b"connect 5",
            b"CONNECT\t5",
            b"",
            b"\xff\xfe",
        ] {
            assert!(
                matches!(parse_connect(bad), Handshake::Refused(_)),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn handshake_reads_only_the_line() {
        let (mut client, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut p = PendingClient::new(server);
        assert_eq!(p.poll(), Handshake::Pending);
        client.write_all(b"CONNECT 10").unwrap();
        assert_eq!(p.poll(), Handshake::Pending);
        client.write_all(b"24\npayload").unwrap();
        assert_eq!(p.poll(), Handshake::Connect(1024));
        let mut rest = [0u8; 7];
        p.stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"payload");
    }

    #[test]
    fn a_pending_client_expires_after_the_timeout() {
        let (_client, server) = UnixStream::pair().unwrap();
        let p = PendingClient::new(server);
        let t = Duration::from_secs(5);
        assert!(!p.expired(p.since + Duration::from_secs(4), t));
        assert!(p.expired(p.since + Duration::from_secs(6), t));
    }

    #[test]
    fn handshake_refuses_long_lines_and_eof() {
        let (mut client, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut p = PendingClient::new(server);
        client.write_all(&[b'7'; 100]).unwrap();
        assert!(matches!(p.poll(), Handshake::Refused(_)));

        let (client, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        drop(client);
        assert!(matches!(
            PendingClient::new(server).poll(),
            Handshake::Refused(_)
        ));
    }

    #[test]
    fn nonblocking_connect() {
        let dir = std::env::temp_dir().join(format!("kiln-vsock-unix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("v.sock");
        let path = host_port_path(&base, 52);
        assert!(path.to_str().unwrap().ends_with("v.sock_52"));
        let _ = std::fs::remove_file(&path);
        let err = connect_nonblocking(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let listener = UnixListener::bind(&path).unwrap();
        let mut s = connect_nonblocking(&path).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        s.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        peer.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        let long = dir.join("x".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
