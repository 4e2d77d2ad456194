use std::io::{self, Cursor, Read};

use super::*;
use crate::protocol::*;

/// One frame of every kind.
fn samples() -> Vec<Frame> {
    vec![
        Frame::Exec(
            ExecRequest::new(["sh", "-c", "echo hi"])
                .env("A", "b=c")
                .cwd("/tmp")
                .stdin_pipe()
                .user(1000, Some(100)),
        ),
        Frame::Signal(SignalRequest {
            target: SignalTarget::Exec(7),
            signo: 15,
        }),
        Frame::Signal(SignalRequest {
            target: SignalTarget::Pid(42),
            signo: 9,
        }),
        Frame::PutFile(PutFile {
            path: "/tmp/x".into(),
            mode: 0o755,
        }),
        Frame::GetFile(GetFile {
            path: "/etc/hostname".into(),
        }),
        Frame::Ping,
        Frame::Shutdown,
        Frame::SetTime(SetTime {
            unix_nanos: 1_700_000_000_123_456_789,
        }),
        Frame::AddEntropy(vec![1, 2, 3, 4]),
        Frame::Exec(ExecRequest::new(["sh", "-l"]).tty(WindowSize { rows: 24, cols: 80 })),
        Frame::Started(Started {
            exec_id: 3,
            pid: 77,
            tty: false,
        }),
        Frame::Started(Started {
            exec_id: 4,
            pid: 78,
            tty: true,
        }),
        Frame::Resize(WindowSize {
            rows: 50,
            cols: 132,
        }),
        Frame::Stdin(b"input".to_vec()),
        Frame::StdinEof,
        Frame::Stdout(vec![0, 255, 10, 13]),
        Frame::Stderr(Vec::new()),
        Frame::Exit(ExitStatus::Code(42)),
        Frame::Exit(ExitStatus::Signal(9)),
        Frame::FileInfo(FileInfo {
            size: 1 << 40,
            mode: 0o644,
        }),
        Frame::Data(vec![7; CHUNK_LEN]),
        Frame::DataEnd,
        Frame::Pong(Pong {
            version: VERSION,
            agent: "0.1.0".into(),
            uptime_ms: 1234,
        }),
        Frame::Ok,
        Frame::error("no such file: /nope"),
    ]
}

/// A reader that hands out one byte per `read` call.
struct ByteAtATime<R>(R);

impl<R: Read> Read for ByteAtATime<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match buf.first_mut() {
            Some(b) => self.0.read(std::slice::from_mut(b)),
            None => Ok(0),
        }
    }
}

/// A reader that reports EINTR before every read.
struct Interrupting<R> {
    inner: R,
    interrupt: bool,
}

impl<R: Read> Read for Interrupting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.interrupt = !self.interrupt;
        if self.interrupt {
            return Err(io::ErrorKind::Interrupted.into());
        }
        self.inner.read(buf)
    }
}

fn header(len: u32, version: u8, kind: u8) -> Vec<u8> {
    let mut h = len.to_le_bytes().to_vec();
    h.extend([version, kind]);
    h
}

#[test]
fn every_kind_round_trips() {
    let frames = samples();
    let kinds: std::collections::HashSet<_> = frames.iter().map(Frame::kind).collect();
    assert_eq!(kinds.len(), Kind::ALL.len(), "the samples cover every kind");
    let mut stream = Vec::new();
    for f in &frames {
        write_frame(&mut stream, f).unwrap();
    }
    let mut r = Cursor::new(stream);
    for f in &frames {
        assert_eq!(read_frame(&mut r).unwrap().as_ref(), Some(f));
    }
    assert!(read_frame(&mut r).unwrap().is_none(), "clean end of stream");
}

#[test]
fn partial_reads_byte_at_a_time() {
    let frames = samples();
    let mut stream = Vec::new();
    for f in &frames {
        write_frame(&mut stream, f).unwrap();
    }
    let mut r = ByteAtATime(Cursor::new(stream.clone()));
    for f in &frames {
        assert_eq!(read_frame(&mut r).unwrap().as_ref(), Some(f));
    }
    assert!(read_frame(&mut r).unwrap().is_none());

    let mut r = Interrupting {
        inner: ByteAtATime(Cursor::new(stream)),
        interrupt: false,
    };
    for f in &frames {
        assert_eq!(read_frame(&mut r).unwrap().as_ref(), Some(f));
    }
}

#[test]
fn write_raw_matches_encode() {
    let mut a = Vec::new();
    write_raw(&mut a, Kind::Stdout, b"hello").unwrap();
    assert_eq!(a, encode(&Frame::Stdout(b"hello".to_vec())).unwrap());
    let err = write_raw(&mut a, Kind::Exit, b"{}").unwrap_err();
    assert!(
        matches!(err, ProtocolError::NotRaw { kind: "Exit" }),
        "{err}"
    );
}

#[test]
fn oversized_frames_are_rejected() {
    // Announced: rejected from the header alone, before any body byte is read.
    let mut bytes = header(
        u32::try_from(MAX_BODY_LEN).unwrap() + 1,
        VERSION,
        Kind::Data as u8,
    );
    bytes.extend([0; 16]);
    let err = read_frame(&mut Cursor::new(bytes)).unwrap_err();
    assert!(matches!(err, ProtocolError::TooLarge { .. }), "{err}");
    assert!(
        err.to_string().contains("over the limit of 1048576 bytes"),
        "{err}"
    );
    let err = read_frame(&mut Cursor::new(header(u32::MAX, VERSION, 0x13))).unwrap_err();
    assert!(matches!(err, ProtocolError::TooLarge { .. }), "{err}");

    // Exactly at the limit: fine.
    let max = Frame::Data(vec![1; MAX_BODY_LEN]);
    let bytes = encode(&max).unwrap();
    assert_eq!(read_frame(&mut Cursor::new(bytes)).unwrap(), Some(max));

    // Sent: refused by the encoder.
    let err = encode(&Frame::Stdout(vec![0; MAX_BODY_LEN + 1])).unwrap_err();
    assert!(matches!(err, ProtocolError::TooLarge { .. }), "{err}");
    let big = Frame::Exec(ExecRequest::new(vec!["x".repeat(MAX_BODY_LEN)]));
    assert!(matches!(encode(&big), Err(ProtocolError::TooLarge { .. })));
}

#[test]
fn unknown_version_is_rejected() {
    let mut bytes = encode(&Frame::Ping).unwrap();
    bytes[4] = VERSION + 1;
    let err = read_frame(&mut Cursor::new(bytes)).unwrap_err();
    assert!(
        matches!(err, ProtocolError::UnsupportedVersion { got, supported: VERSION } if got == VERSION + 1),
        "{err}"
    );
    assert!(
        err.to_string().contains("unsupported protocol version 2"),
        "{err}"
    );
}

#[test]
fn bodies_of_an_older_peer_read_without_the_terminal_fields() {
    let mut bytes = header(0, VERSION, Kind::Started as u8);
    let body = br#"{"exec_id":5,"pid":9}"#;
    bytes[..4].copy_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
    bytes.extend(body);
    let frame = read_frame(&mut Cursor::new(bytes)).unwrap();
    assert_eq!(
        frame,
        Some(Frame::Started(Started {
            exec_id: 5,
            pid: 9,
            tty: false
        }))
    );
    let mut bytes = header(0, VERSION, Kind::Exec as u8);
    let body = br#"{"argv":["true"]}"#;
    bytes[..4].copy_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
    bytes.extend(body);
    let Some(Frame::Exec(req)) = read_frame(&mut Cursor::new(bytes)).unwrap() else {
        panic!("not an Exec frame");
    };
    assert_eq!(req, ExecRequest::new(["true"]));
}

#[test]
fn unknown_kinds_bad_bodies_and_truncation_are_errors() {
    let err = read_frame(&mut Cursor::new(header(0, VERSION, 0x7f))).unwrap_err();
    assert!(matches!(err, ProtocolError::UnknownKind(0x7f)), "{err}");

    let mut bytes = header(5, VERSION, Kind::Exec as u8);
    bytes.extend(b"{bad}");
    let err = read_frame(&mut Cursor::new(bytes)).unwrap_err();
    assert!(err.to_string().starts_with("malformed Exec frame"), "{err}");

    let mut bytes = header(2, VERSION, Kind::Ping as u8);
    bytes.extend(b"{}");
    let err = read_frame(&mut Cursor::new(bytes)).unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::UnexpectedBody {
                kind: "Ping",
                len: 2
            }
        ),
        "{err}"
    );

    let err = read_frame(&mut Cursor::new(vec![1, 0, 0])).unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::Truncated {
                part: "header",
                got: 3,
                ..
            }
        ),
        "{err}"
    );

    let mut bytes = encode(&Frame::Stdout(vec![9; 100])).unwrap();
    bytes.truncate(50);
    let err = read_frame(&mut Cursor::new(bytes)).unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::Truncated {
                part: "body",
                expected: 100,
                got: 44
            }
        ),
        "{err}"
    );
}

/// xorshift64*: deterministic pseudo-random bytes without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next().to_le_bytes()[0]).collect()
    }
}

#[test]
fn garbage_never_panics() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..2000 {
        let len = usize::try_from(rng.next() % 64).unwrap();
        let mut bytes = rng.bytes(len);
        // Half the rounds: a valid header prefix with a random kind and body, so the
        // decoder reaches the body parsers, not only the version check.
        if round % 2 == 0 && bytes.len() >= HEADER_LEN {
            let body_len = u32::try_from(bytes.len() - HEADER_LEN).unwrap();
            bytes[..4].copy_from_slice(&body_len.to_le_bytes());
            bytes[4] = VERSION;
            bytes[5] =
                Kind::ALL[usize::try_from(rng.next() % Kind::ALL.len() as u64).unwrap()] as u8;
        }
        let mut r = Cursor::new(bytes);
        // Read until the stream ends or fails; any result is fine, a panic is not.
        for _ in 0..8 {
            match read_frame(&mut r) {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
    // Text a confused client might send: an HTTP request, the hybrid-vsock handshake.
    for text in [
        "GET / HTTP/1.1\r\n\r\n",
        "CONNECT 1024\n",
        "OK 1073741824\n",
    ] {
        assert!(
            read_frame(&mut Cursor::new(text.as_bytes())).is_err(),
            "{text:?}"
        );
    }
}
