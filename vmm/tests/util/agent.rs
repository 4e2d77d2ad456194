//! A fake guest agent behind a VM's hybrid-vsock Unix socket, as far as a restored guest's
//! refresh needs: the handshake, then framed requests answered.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use kiln_agent::protocol::{read_frame, write_frame, Frame, Pong, AGENT_PORT};

/// Serves connections on `uds` as the VMM and the agent behind it would: each gets the
/// hybrid-vsock handshake (`CONNECT <AGENT_PORT>`, answered `OK 1`); then a Ping is
/// answered with a Pong and every other request with what `answer` says. The first
/// `ignored` connections get the handshake and nothing more, and stay open (as when the
/// guest drops a connection made before it handled the vsock transport reset after a
/// restore); after them, at most `served` connections are served (`None`: any number).
pub fn serve(
    uds: &Path,
    ignored: usize,
    served: Option<usize>,
    mut answer: impl FnMut(Frame) -> Frame + Send + 'static,
) {
    let listener = UnixListener::bind(uds).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        let limit = served.map_or(usize::MAX, |n| ignored + n);
        for (n, stream) in listener.incoming().take(limit).enumerate() {
            let (mut reader, mut writer) = handshake(stream.unwrap());
            if n < ignored {
                held.push(writer);
                continue;
            }
            while let Ok(Some(frame)) = read_frame(&mut reader) {
                let reply = match frame {
                    Frame::Ping => pong(),
                    other => answer(other),
                };
                write_frame(&mut writer, &reply).unwrap();
            }
        }
    });
}

/// Answers a new connection's `CONNECT <AGENT_PORT>` as the VMM does; returns its reading
/// and writing halves.
pub fn handshake(stream: UnixStream) -> (BufReader<UnixStream>, UnixStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut hello = String::new();
    reader.read_line(&mut hello).unwrap();
    assert_eq!(hello, format!("CONNECT {AGENT_PORT}\n"));
    let mut writer = stream;
    writer.write_all(b"OK 1\n").unwrap();
    (reader, writer)
}

/// The fake agent's answer to `Ping`.
pub fn pong() -> Frame {
    Frame::Pong(Pong {
        version: 1,
        agent: "fake".into(),
        uptime_ms: 1,
    })
}
