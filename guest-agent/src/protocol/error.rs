//! Errors of the frame codec.

use std::io;

use super::{MAX_BODY_LEN, VERSION};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The connection failed.
    #[error("agent connection I/O: {0}")]
    Io(io::Error),
    /// The peer closed the connection in the middle of a frame.
    #[error("the connection ended in the middle of a frame: got {got} of the {expected} bytes of its {part}")]
    Truncated {
        /// "header" or "body".
        part: &'static str,
        /// Bytes the part has.
        expected: usize,
        /// Bytes that arrived.
        got: usize,
    },
    /// The frame's version byte is not [`VERSION`].
    #[error("unsupported protocol version {got} (this side speaks version {supported}); use a kiln and a kiln-agent built from the same release")]
    UnsupportedVersion {
        /// The version byte received.
        got: u8,
        /// The version this build speaks.
        supported: u8,
    },
    /// The frame's body is longer than [`MAX_BODY_LEN`].
    #[error("frame body of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// The announced or attempted body length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The frame's kind byte is not one this version knows.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// A JSON body did not parse as the message its kind names.
    #[error("malformed {kind} frame: {reason}")]
    BadBody {
        /// The frame kind's name.
        kind: &'static str,
        /// What the JSON parser said.
        reason: serde_json::Error,
    },
    /// A marker frame (`Ping`, `Ok`, …) came with a body.
    #[error("{kind} frame must have an empty body, got {len} bytes")]
    UnexpectedBody {
        /// The frame kind's name.
        kind: &'static str,
        /// The body's length.
        len: usize,
    },
    /// [`super::write_raw`] was given a kind that does not carry raw bytes.
    #[error("{kind} frames do not carry raw bytes")]
    NotRaw {
        /// The frame kind's name.
        kind: &'static str,
    },
}

impl From<io::Error> for ProtocolError {
    fn from(e: io::Error) -> Self {
        ProtocolError::Io(e)
    }
}

impl ProtocolError {
    /// An [`ProtocolError::UnsupportedVersion`] for `got`.
    pub(super) fn version(got: u8) -> Self {
        ProtocolError::UnsupportedVersion {
            got,
            supported: VERSION,
        }
    }

    /// A [`ProtocolError::TooLarge`] for `len`.
    pub(super) fn too_large(len: u64) -> Self {
        ProtocolError::TooLarge {
            len,
            max: MAX_BODY_LEN,
        }
    }
}
