//! The client's errors.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::protocol::{Kind, ProtocolError};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The VM's Unix socket could not be reached.
    #[error("connecting to the VM's vsock socket {}: {error}", path.display())]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// What connect said.
        error: io::Error,
    },
    /// The VMM did not answer `OK <port>` to `CONNECT <port>`.
    #[error("the VMM answered {answer:?} to CONNECT {port} on {} instead of \"OK <port>\"; is the guest agent up and listening on vsock port {port}?", path.display())]
    Refused {
        /// The socket's path.
        path: PathBuf,
        /// The guest port asked for.
        port: u32,
        /// The line received (empty if the VMM closed the connection).
        answer: String,
    },
    /// The VMM accepted the connection but no answer to `CONNECT <port>` came in time.
    /// Right after a snapshot restore, the guest silently drops connections made before
    /// it has handled the vsock transport reset; connecting again is the remedy.
    #[error("no answer to CONNECT {port} on {} within {timeout:?}; the guest may have dropped the connection (it does so right after a snapshot restore, until it has handled the vsock transport reset); connect again", path.display())]
    HandshakeTimeout {
        /// The socket's path.
        path: PathBuf,
        /// The guest port asked for.
        port: u32,
        /// How long the client waited for the answer.
        timeout: Duration,
    },
    /// The frame codec or the connection failed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The agent answered `Error`.
    #[error("the agent reported: {0}")]
    Remote(String),
    /// The agent sent a frame that does not fit the conversation.
    #[error("the agent sent a {got} frame while the client waited for {expected}")]
    Unexpected {
        /// What arrived.
        got: Kind,
        /// What the client waited for.
        expected: &'static str,
    },
    /// The agent closed the connection.
    #[error("the agent closed the connection while the client waited for {0}")]
    Closed(&'static str),
    /// A local source or sink (stdin, stdout, a file) failed.
    #[error("{what}: {error}")]
    Local {
        /// What the client was doing.
        what: &'static str,
        /// The I/O error.
        error: io::Error,
    },
    /// An earlier error left this connection in the middle of a request.
    #[error("this agent connection was left in the middle of a request by an earlier error; connect again")]
    Broken,
    /// [`wait_ready`](super::wait_ready) ran out of time.
    #[error("the agent behind {} (vsock port {port}) did not answer within {timeout:?}; last attempt: {last}", path.display())]
    NotReady {
        /// The socket's path.
        path: PathBuf,
        /// The guest port.
        port: u32,
        /// How long it waited.
        timeout: Duration,
        /// Why the last attempt failed.
        last: String,
    },
    /// A terminal was asked for and the agent started the process without one: it
    /// predates terminals. The client has closed the connection, which kills the process.
    #[error("the guest agent started the command without a terminal: it is older than this kiln and has no terminal support; run the command without a terminal, or boot an image with a newer kiln-agent")]
    NoTerminal,
    /// The call's arguments do not fit together.
    #[error("{0}")]
    Usage(&'static str),
}

impl ClientError {
    /// True if the connection is still in step after this error (the agent answered
    /// `Error`, or nothing was sent).
    pub(super) fn keeps_connection(&self) -> bool {
        matches!(self, ClientError::Remote(_) | ClientError::Usage(_))
    }
}
