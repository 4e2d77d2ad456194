//! One stream connection between a guest port and a host Unix socket.
//!
//! Credit flow control, both ways (virtio 1.2, 5.10.6.3):
//! - host → guest: the guest advertises `buf_alloc` and `fwd_cnt` in every packet; we never
//!   have more than `buf_alloc` bytes in flight (`tx_cnt - peer_fwd_cnt`), read the host
//!   socket only while there is credit, and ask for credit when it runs out.
//! - guest → host: we advertise [`CONN_BUF_ALLOC`] and count what reached the host socket
//!   in `fwd_cnt`. Bytes the host socket cannot take yet wait in `to_host`, which the
//!   guest's credit bounds; a guest that sends past its credit is reset.
//!
//! All counters wrap at 2^32, as the spec's do.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use event_manager::EventSet;
use vm_memory::{VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::{
    op, CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD, MAX_PKT_DATA, SHUTDOWN_RCV, SHUTDOWN_SEND,
};

/// Control packets waiting for an rx buffer, in the order they are sent.
const PENDING_ORDER: [u16; 4] = [
    op::REQUEST,
    op::RESPONSE,
    op::CREDIT_UPDATE,
    op::CREDIT_REQUEST,
];

fn bit(op: u16) -> u8 {
    1 << op
}

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("packet op {0} is not valid in this connection state")]
    Protocol(u16),
    #[error("guest sent past its credit ({0} bytes in flight)")]
    CreditOverrun(u32),
    #[error("host socket: {0}")]
    Io(#[from] io::Error),
}

/// What the connection put into an rx buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fill {
    /// A packet with this much payload.
    Sent(u32),
    /// Nothing to send after all.
    Nothing,
    /// The host socket failed: reset the connection.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A host client asked for the guest port; waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

mod to_guest;

#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) stream: UnixStream,
    /// The host-side port (our `src_port`).
    pub(crate) local_port: u32,
    /// The guest-side port.
    pub(crate) peer_port: u32,
    state: State,
    /// Bit set of `op`s waiting to be sent (see [`PENDING_ORDER`]); SHUTDOWN separately.
    pending: u8,
    /// Whether the connection is in the muxer's rx queue.
    pub(crate) queued: bool,
    // Host → guest.
    host_readable: bool,
    host_eof: bool,
    host_hup: bool,
    shutdown_sent: u32,
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    credit_requested: bool,
    // Guest → host.
    to_host: VecDeque<u8>,
    /// Leading bytes of `to_host` that are ours (the `OK` line), not guest payload.
    prelude: usize,
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    guest_shut_send: bool,
    guest_shut_rcv: bool,
    host_write_shut: bool,
}

impl Connection {
    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State, op: u16) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state,
            pending: bit(op),
            queued: false,
            host_readable: false,
            host_eof: false,
            host_hup: false,
            shutdown_sent: 0,
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            to_host: VecDeque::new(),
            prelude: 0,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            guest_shut_send: false,
            guest_shut_rcv: false,
            host_write_shut: false,
        }
    }

    /// A host client's `CONNECT`: send REQUEST, wait for RESPONSE.
    pub(crate) fn host_initiated(stream: UnixStream, local_port: u32, peer_port: u32) -> Self {
        Self::new(
            stream,
            local_port,
            peer_port,
            State::Connecting,
            op::REQUEST,
        )
    }

    /// A guest REQUEST whose host socket is connected: answer RESPONSE.
    pub(crate) fn guest_initiated(stream: UnixStream, local_port: u32, peer_port: u32) -> Self {
        Self::new(
            stream,
            local_port,
            peer_port,
            State::Established,
            op::RESPONSE,
        )
    }

    /// Bytes the guest still has room for.
    pub(crate) fn interest(&self) -> Option<EventSet> {
        // A hung-up socket reports HUP on every wait: stop watching; what is left to read
        // is pulled by the rx path.
        if self.host_hup {
            return None;
        }
        let mut set = EventSet::empty();
        if self.state == State::Established
            && !self.host_readable
            && !self.host_eof
            && !self.guest_shut_rcv
            && self.peer_credit() > 0
        {
            set |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            set |= EventSet::OUT;
        }
        // Even an empty set reports HUP and ERR.
        Some(set)
    }

    /// The host socket is readable, writable or hung up.
    pub(crate) fn on_host_event(&mut self, set: EventSet) -> Result<(), ConnError> {
        if set.contains(EventSet::ERROR) {
            return Err(io::Error::other("error condition on the host socket").into());
        }
        if set.contains(EventSet::HANG_UP) {
            if self.state == State::Connecting {
                return Err(io::Error::other("host client left before the guest answered").into());
            }
            self.host_hup = true;
        }
        if set.intersects(EventSet::IN | EventSet::HANG_UP) && self.state == State::Established {
            self.host_readable = true;
        }
        if set.contains(EventSet::OUT) || set.contains(EventSet::HANG_UP) {
            self.flush_to_host()?;
        }
        Ok(())
    }

    /// The guest accepted our REQUEST.
    pub(crate) fn on_response(&mut self) -> Result<(), ConnError> {
        if self.state != State::Connecting {
            return Err(ConnError::Protocol(op::RESPONSE));
        }
        self.state = State::Established;
        let line = format!("OK {}\n", self.local_port);
        self.prelude = line.len();
        self.to_host.extend(line.as_bytes());
        self.flush_to_host()?;
        Ok(())
    }

    pub(crate) fn on_shutdown(&mut self, flags: u32) {
        self.guest_shut_rcv |= flags & SHUTDOWN_RCV != 0;
        self.guest_shut_send |= flags & SHUTDOWN_SEND != 0;
    }

    pub(crate) fn on_credit_request(&mut self) {
        self.pending |= bit(op::CREDIT_UPDATE);
    }

    /// Payload from the guest: to the host socket, or into `to_host` if it is full.
    pub(crate) fn on_rw(&mut self, data: Option<&VolatileSlice<'_, ()>>) -> Result<(), ConnError> {
        if self.state != State::Established || self.guest_shut_send {
            return Err(ConnError::Protocol(op::RW));
        }
        let Some(data) = data else {
            return Ok(());
        };
        // `VsockPacket` caps payloads at MAX_PKT_DATA, so this fits.
        let len = u32::try_from(data.len()).unwrap_or(MAX_PKT_DATA);
        let in_flight = (self.rx_cnt + Wrapping(len) - self.fwd_cnt).0;
        if in_flight > CONN_BUF_ALLOC {
            return Err(ConnError::CreditOverrun(in_flight));
        }
        self.rx_cnt += Wrapping(len);
        let mut written = 0;
        if self.to_host.is_empty() {
            written = match self.stream.write_volatile(data) {
                Ok(n) => n,
                Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(VolatileMemoryError::IOError(e)) => return Err(e.into()),
                Err(e) => return Err(io::Error::other(e).into()),
            };
            self.count_forwarded(written);
        }
        if written < data.len() {
            let rest = data
                .offset(written)
                .map_err(|e| ConnError::Io(io::Error::other(e)))?;
            let mut buf = vec![0u8; rest.len()];
            rest.copy_to(&mut buf);
            self.to_host.extend(buf);
        }
        Ok(())
    }

    /// Write what waits in `to_host` until the socket would block.
    pub(crate) fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    let ours = n.min(self.prelude);
                    self.prelude -= ours;
                    self.count_forwarded(n - ours);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn count_forwarded(&mut self, n: usize) {
        self.fwd_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
        // The guest's view of our free space is what we last told it.
        let unacked = (self.rx_cnt - self.last_fwd_cnt_sent).0;
        let room = CONN_BUF_ALLOC.saturating_sub(unacked);
        if self.fwd_cnt != self.last_fwd_cnt_sent && room < CREDIT_UPDATE_THRESHOLD {
            self.pending |= bit(op::CREDIT_UPDATE);
        }
    }

    /// Apply the end-of-stream rules. Returns true when the connection is finished both
    /// ways: the caller resets it (the guest waits for that RST to complete its close).
    pub(crate) fn finished(&mut self) -> bool {
        if !self.guest_shut_send || !self.to_host.is_empty() {
            return false;
        }
        if !self.host_write_shut {
            // Everything the guest sent has reached the host: pass its EOF on.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        self.host_eof || self.host_hup || self.guest_shut_rcv
    }
}
