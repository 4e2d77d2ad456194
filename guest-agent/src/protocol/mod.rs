//! The wire protocol between the host (`kiln`, [`crate::client`]) and the guest agent.
//!
//! # Framing
//!
//! Every message is one frame:
//!
//! ```text
//! +----------------------+-----------+---------+----------------------+
//! | body length: u32 LE  | version u8| kind u8 | body (length bytes)  |
//! +----------------------+-----------+---------+----------------------+
//! ```
//!
//! The body is at most [`MAX_BODY_LEN`] bytes. Structured messages carry a JSON body; bulk data
//! (`Stdout`, `Stderr`, `Stdin`, `Data`, `AddEntropy`) carries raw bytes; markers (`Ping`,
//! `Shutdown`, `StdinEof`, `DataEnd`, `Ok`) have an empty body. A reader rejects a frame of
//! another [`VERSION`], an oversized frame or an unknown kind before reading its body.
//!
//! # Conversations
//!
//! A connection carries one request at a time; after a request's last answer, the client may
//! send the next one. Several connections are served at once.
//!
//! - `Exec` → `Started` → (`Stdout` | `Stderr`)* → `Exit`, or `Error` if it could not start.
//!   With `stdin: pipe`, the client sends `Stdin`* then `StdinEof` (also after `Exit`, if it
//!   was still sending; the agent drops stdin the process no longer reads).
//! - `Exec` with `tty` (a pseudo-terminal): as above, with `Started { tty: true }`, output
//!   as `Stdout` only, and the client may send `Resize` between its `Stdin` frames until
//!   `Exit`. `StdinEof` only stops input: a terminal has no end of input (the client sends
//!   the EOF character, Ctrl-D, as a byte).
//! - `Signal` → `Ok` | `Error` (cancel; sent on a connection of its own).
//! - `PutFile` → the client sends `Data`* `DataEnd` → `Ok` | `Error`.
//! - `GetFile` → `FileInfo` `Data`* `DataEnd`, or `Error` (also in place of `DataEnd`).
//! - `Ping` → `Pong`; `SetTime` / `AddEntropy` → `Ok` | `Error`; `Shutdown` → `Ok`, then the
//!   guest syncs and reboots (the connection may end before the `Ok` arrives).
//!
//! Any frame that does not fit the conversation makes the agent answer `Error` and close the
//! connection.
//!
//! # Compatibility
//!
//! Within a version, messages only grow: a new field is optional (`#[serde(default)]`)
//! and a new kind is sent only after the other end has shown it knows it (`Resize` only
//! after `Started { tty: true }`, which an older agent never sends).

mod codec;
mod error;
mod messages;

pub use codec::{encode, read_frame, write_frame, write_raw};
pub use error::ProtocolError;
pub use messages::{
    ErrorMessage, ExecRequest, ExitStatus, FileInfo, GetFile, Pong, PutFile, SetTime,
    SignalRequest, SignalTarget, Started, StdinMode, WindowSize,
};

/// The protocol version this build speaks; both ends must speak the same.
pub const VERSION: u8 = 1;

/// Bytes in a frame header: body length (u32 LE), version, kind.
pub const HEADER_LEN: usize = 6;

/// The largest body a frame may carry (1 MiB).
pub const MAX_BODY_LEN: usize = 1 << 20;

/// The size of the data chunks both ends send (`Stdout`, `Data`, …).
pub const CHUNK_LEN: usize = 64 * 1024;

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;

/// One message on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Run a process (request).
    Exec(ExecRequest),
    /// Send a signal to an exec's process group or to a pid (request).
    Signal(SignalRequest),
    /// Write a file; `Data` chunks and `DataEnd` follow (request).
    PutFile(PutFile),
    /// Read a file (request).
    GetFile(GetFile),
    /// Liveness check (request).
    Ping,
    /// Sync and reboot the guest (request).
    Shutdown,
    /// Set the guest's wall clock (request).
    SetTime(SetTime),
    /// Bytes to add to the guest's entropy pool (request).
    AddEntropy(Vec<u8>),
    /// The exec is running: its id and pid.
    Started(Started),
    /// Bytes for the process's standard input.
    Stdin(Vec<u8>),
    /// The client has no more standard input.
    StdinEof,
    /// The terminal of the connection's exec has a new size.
    Resize(WindowSize),
    /// Bytes the process wrote to its standard output.
    Stdout(Vec<u8>),
    /// Bytes the process wrote to its standard error.
    Stderr(Vec<u8>),
    /// How the process ended; the last frame of an exec.
    Exit(ExitStatus),
    /// Size and mode of the file a `GetFile` sends.
    FileInfo(FileInfo),
    /// A chunk of file contents.
    Data(Vec<u8>),
    /// The end of a file's contents.
    DataEnd,
    /// The answer to `Ping`.
    Pong(Pong),
    /// The request succeeded.
    Ok,
    /// The request failed, or the connection is being closed for a protocol error.
    Error(ErrorMessage),
}

/// The kind byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// [`Frame::Exec`].
    Exec = 0x01,
    /// [`Frame::Signal`].
    Signal = 0x02,
    /// [`Frame::PutFile`].
    PutFile = 0x03,
    /// [`Frame::GetFile`].
    GetFile = 0x04,
    /// [`Frame::Ping`].
    Ping = 0x05,
    /// [`Frame::Shutdown`].
    Shutdown = 0x06,
    /// [`Frame::SetTime`].
    SetTime = 0x07,
    /// [`Frame::AddEntropy`].
    AddEntropy = 0x08,
    /// [`Frame::Started`].
    Started = 0x10,
    /// [`Frame::Stdin`].
    Stdin = 0x11,
    /// [`Frame::StdinEof`].
    StdinEof = 0x12,
    /// [`Frame::Stdout`].
    Stdout = 0x13,
    /// [`Frame::Stderr`].
    Stderr = 0x14,
    /// [`Frame::Exit`].
    Exit = 0x15,
    /// [`Frame::Resize`].
    Resize = 0x16,
    /// [`Frame::FileInfo`].
    FileInfo = 0x20,
    /// [`Frame::Data`].
    Data = 0x21,
    /// [`Frame::DataEnd`].
    DataEnd = 0x22,
    /// [`Frame::Ok`].
    Ok = 0x30,
    /// [`Frame::Error`].
    Error = 0x31,
    /// [`Frame::Pong`].
    Pong = 0x32,
}

/// How a kind's body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    /// A JSON document.
    Json,
    /// Raw bytes.
    Raw,
    /// Nothing: the body must be empty.
    Empty,
}

impl Kind {
    /// Every kind, for tests and documentation.
    pub const ALL: [Kind; 21] = [
        Kind::Exec,
        Kind::Signal,
        Kind::PutFile,
        Kind::GetFile,
        Kind::Ping,
        Kind::Shutdown,
        Kind::SetTime,
        Kind::AddEntropy,
        Kind::Started,
        Kind::Stdin,
        Kind::StdinEof,
        Kind::Stdout,
        Kind::Stderr,
        Kind::Exit,
        Kind::Resize,
        Kind::FileInfo,
        Kind::Data,
        Kind::DataEnd,
        Kind::Ok,
        Kind::Error,
        Kind::Pong,
    ];

    /// The kind whose byte is `byte`, if any.
    pub fn from_byte(byte: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u8 == byte)
    }

    /// How this kind's body is encoded.
    pub fn body_type(self) -> BodyType {
        match self {
            Kind::AddEntropy | Kind::Stdin | Kind::Stdout | Kind::Stderr | Kind::Data => {
                BodyType::Raw
            }
            Kind::Ping | Kind::Shutdown | Kind::StdinEof | Kind::DataEnd | Kind::Ok => {
                BodyType::Empty
            }
            _ => BodyType::Json,
        }
    }

    /// The kind's name, as error messages show it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Exec => "Exec",
            Kind::Signal => "Signal",
            Kind::PutFile => "PutFile",
            Kind::GetFile => "GetFile",
            Kind::Ping => "Ping",
            Kind::Shutdown => "Shutdown",
            Kind::SetTime => "SetTime",
            Kind::AddEntropy => "AddEntropy",
            Kind::Started => "Started",
            Kind::Stdin => "Stdin",
            Kind::StdinEof => "StdinEof",
            Kind::Stdout => "Stdout",
            Kind::Stderr => "Stderr",
            Kind::Exit => "Exit",
            Kind::Resize => "Resize",
            Kind::FileInfo => "FileInfo",
            Kind::Data => "Data",
            Kind::DataEnd => "DataEnd",
            Kind::Ok => "Ok",
            Kind::Error => "Error",
            Kind::Pong => "Pong",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Frame {
    /// This frame's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Exec(_) => Kind::Exec,
            Frame::Signal(_) => Kind::Signal,
            Frame::PutFile(_) => Kind::PutFile,
            Frame::GetFile(_) => Kind::GetFile,
            Frame::Ping => Kind::Ping,
            Frame::Shutdown => Kind::Shutdown,
            Frame::SetTime(_) => Kind::SetTime,
            Frame::AddEntropy(_) => Kind::AddEntropy,
            Frame::Started(_) => Kind::Started,
            Frame::Stdin(_) => Kind::Stdin,
            Frame::StdinEof => Kind::StdinEof,
            Frame::Stdout(_) => Kind::Stdout,
            Frame::Stderr(_) => Kind::Stderr,
            Frame::Exit(_) => Kind::Exit,
            Frame::Resize(_) => Kind::Resize,
            Frame::FileInfo(_) => Kind::FileInfo,
            Frame::Data(_) => Kind::Data,
            Frame::DataEnd => Kind::DataEnd,
            Frame::Pong(_) => Kind::Pong,
            Frame::Ok => Kind::Ok,
            Frame::Error(_) => Kind::Error,
        }
    }

    /// An `Error` frame with `message`.
    pub fn error(message: impl std::fmt::Display) -> Frame {
        Frame::Error(ErrorMessage {
            message: message.to_string(),
        })
    }
}
