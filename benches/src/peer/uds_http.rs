//! `kiln-benches uds-http METHOD PATH SOCKET [BODY]`: one HTTP/1.1 request over a Unix
//! socket, for driving Firecracker's API server from a benchmark's test-bed script (the
//! test bed has no HTTP client that speaks to a Unix socket). Exits 0 on a 2xx status,
//! else prints the response and exits 1.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The argument that selects this mode instead of the benchmarks.
pub const SUBCOMMAND: &str = "uds-http";

/// Runs the request named by `args` (after the subcommand).
pub fn main(args: &[String]) -> Result<()> {
    let [method, path, socket, rest @ ..] = args else {
        bail!("usage: kiln-benches {SUBCOMMAND} METHOD PATH SOCKET [BODY]");
    };
    let body = rest.first().map_or("", String::as_str);
    let mut stream =
        UnixStream::connect(socket).with_context(|| format!("connecting to {socket}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let response = read_response(&mut stream)?;
    let status: u16 = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP response: {response:?}"))?;
    if !(200..300).contains(&status) {
        bail!("{method} {path}: {response}");
    }
    Ok(())
}

/// Reads one response: its head, then as many body bytes as its Content-Length says.
fn read_response(stream: &mut UnixStream) -> Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf);
        if let Some(head_end) = text.find("\r\n\r\n") {
            let length = text[..head_end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= head_end + 4 + length {
                return Ok(text.into_owned());
            }
        }
        let n = stream.read(&mut chunk).context("reading the response")?;
        if n == 0 {
            if buf.is_empty() {
                bail!("the server closed the connection without a response");
            }
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
