//! Encoding frames to bytes and reading them back from a stream.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{BodyType, Frame, Kind, ProtocolError, HEADER_LEN, MAX_BODY_LEN, VERSION};

/// Encodes `frame` (header and body) into one buffer.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, ProtocolError> {
    let kind = frame.kind();
    let mut out = vec![0; HEADER_LEN];
    match frame {
        Frame::Exec(m) => json(&mut out, kind, m)?,
        Frame::Signal(m) => json(&mut out, kind, m)?,
        Frame::PutFile(m) => json(&mut out, kind, m)?,
        Frame::GetFile(m) => json(&mut out, kind, m)?,
        Frame::SetTime(m) => json(&mut out, kind, m)?,
        Frame::Started(m) => json(&mut out, kind, m)?,
        Frame::Exit(m) => json(&mut out, kind, m)?,
        Frame::Resize(m) => json(&mut out, kind, m)?,
        Frame::FileInfo(m) => json(&mut out, kind, m)?,
        Frame::Pong(m) => json(&mut out, kind, m)?,
        Frame::Error(m) => json(&mut out, kind, m)?,
        Frame::AddEntropy(b)
        | Frame::Stdin(b)
        | Frame::Stdout(b)
        | Frame::Stderr(b)
        | Frame::Data(b) => out.extend_from_slice(b),
        Frame::Ping | Frame::Shutdown | Frame::StdinEof | Frame::DataEnd | Frame::Ok => {}
    }
    fill_header(&mut out, kind)?;
    Ok(out)
}

/// Writes `frame` with a single `write_all`.
pub fn write_frame<W: Write + ?Sized>(w: &mut W, frame: &Frame) -> Result<(), ProtocolError> {
    let bytes = encode(frame)?;
    w.write_all(&bytes)?;
    Ok(())
}

/// Writes a frame of a raw-bytes kind (`Stdout`, `Data`, …) with `body` as its body, without
/// building a [`Frame`].
pub fn write_raw<W: Write + ?Sized>(
    w: &mut W,
    kind: Kind,
    body: &[u8],
) -> Result<(), ProtocolError> {
    if kind.body_type() != BodyType::Raw {
        return Err(ProtocolError::NotRaw { kind: kind.name() });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.resize(HEADER_LEN, 0);
    out.extend_from_slice(body);
    fill_header(&mut out, kind)?;
    w.write_all(&out)?;
    Ok(())
}

fn json<T: Serialize>(out: &mut Vec<u8>, kind: Kind, message: &T) -> Result<(), ProtocolError> {
    serde_json::to_writer(&mut *out, message).map_err(|reason| ProtocolError::BadBody {
        kind: kind.name(),
        reason,
    })
}

/// Writes the header into the first [`HEADER_LEN`] bytes of `out`, whose rest is the body.
fn fill_header(out: &mut [u8], kind: Kind) -> Result<(), ProtocolError> {
    let body_len = out.len() - HEADER_LEN;
    if body_len > MAX_BODY_LEN {
        return Err(ProtocolError::too_large(body_len as u64));
    }
    let len = u32::try_from(body_len).map_err(|_| ProtocolError::too_large(body_len as u64))?;
    out[..4].copy_from_slice(&len.to_le_bytes());
    out[4] = VERSION;
    out[5] = kind as u8;
    Ok(())
}

/// Reads one frame. Returns `Ok(None)` if the stream ended cleanly before a frame began.
///
/// Works on any reader, however it splits the bytes (it keeps reading until the header and
/// the body are whole). Checks the version, the length and the kind before it reads the
/// body, and allocates only as the body arrives. Never panics, whatever the input.
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Option<Frame>, ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_full(r, &mut header)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(ProtocolError::Truncated {
            part: "header",
            expected: HEADER_LEN,
            got,
        });
    }
    let [l0, l1, l2, l3, version, kind_byte] = header;
    if version != VERSION {
        return Err(ProtocolError::version(version));
    }
    let len = u32::from_le_bytes([l0, l1, l2, l3]);
    if u64::from(len) > MAX_BODY_LEN as u64 {
        return Err(ProtocolError::too_large(u64::from(len)));
    }
    let kind = Kind::from_byte(kind_byte).ok_or(ProtocolError::UnknownKind(kind_byte))?;
    // `len` is at most MAX_BODY_LEN here, so it fits in usize.
    let len = len as usize;
    let mut body = Vec::new();
    let got = read_body(r, len, &mut body)?;
    if got < len {
        return Err(ProtocolError::Truncated {
            part: "body",
            expected: len,
            got,
        });
    }
    decode_body(kind, body).map(Some)
}

/// Fills `buf` as far as the stream goes; returns how many bytes it read.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Appends up to `len` bytes to `body`; returns how many arrived before the stream ended.
fn read_body<R: Read + ?Sized>(r: &mut R, len: usize, body: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 8192];
    while body.len() < len {
        let want = (len - body.len()).min(chunk.len());
        match r.read(&mut chunk[..want]) {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(body.len())
}

fn decode_body(kind: Kind, body: Vec<u8>) -> Result<Frame, ProtocolError> {
    if kind.body_type() == BodyType::Empty && !body.is_empty() {
        return Err(ProtocolError::UnexpectedBody {
            kind: kind.name(),
            len: body.len(),
        });
    }
    Ok(match kind {
        Kind::Exec => Frame::Exec(parse(kind, &body)?),
        Kind::Signal => Frame::Signal(parse(kind, &body)?),
        Kind::PutFile => Frame::PutFile(parse(kind, &body)?),
        Kind::GetFile => Frame::GetFile(parse(kind, &body)?),
        Kind::SetTime => Frame::SetTime(parse(kind, &body)?),
        Kind::Started => Frame::Started(parse(kind, &body)?),
        Kind::Exit => Frame::Exit(parse(kind, &body)?),
        Kind::Resize => Frame::Resize(parse(kind, &body)?),
        Kind::FileInfo => Frame::FileInfo(parse(kind, &body)?),
        Kind::Pong => Frame::Pong(parse(kind, &body)?),
        Kind::Error => Frame::Error(parse(kind, &body)?),
        Kind::AddEntropy => Frame::AddEntropy(body),
        Kind::Stdin => Frame::Stdin(body),
        Kind::Stdout => Frame::Stdout(body),
        Kind::Stderr => Frame::Stderr(body),
        Kind::Data => Frame::Data(body),
        Kind::Ping => Frame::Ping,
        Kind::Shutdown => Frame::Shutdown,
        Kind::StdinEof => Frame::StdinEof,
        Kind::DataEnd => Frame::DataEnd,
        Kind::Ok => Frame::Ok,
    })
}

fn parse<T: DeserializeOwned>(kind: Kind, body: &[u8]) -> Result<T, ProtocolError> {
    serde_json::from_slice(body).map_err(|reason| ProtocolError::BadBody {
        kind: kind.name(),
        reason,
    })
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;
