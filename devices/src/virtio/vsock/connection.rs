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
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::packet_io::{Header, Pkt};
use super::{
    op, CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD, HOST_CID, MAX_PKT_DATA, SHUTDOWN_RCV,
    SHUTDOWN_SEND,
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
    pub(crate) fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Every guest packet carries its current buffer space.
    pub(crate) fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && !self.guest_shut_rcv
            && self.peer_credit() > 0
    }

    /// Whether the connection has a packet for the guest.
    pub(crate) fn has_rx_work(&self) -> bool {
        self.pending != 0 || self.can_send_data() || self.shutdown_due() != 0
    }

    /// SHUTDOWN flags the guest has not been told yet.
    fn shutdown_due(&self) -> u32 {
        let mut flags = 0;
        if self.host_eof {
            flags |= SHUTDOWN_SEND;
            if self.host_hup {
                flags |= SHUTDOWN_RCV;
            }
        }
        if flags & !self.shutdown_sent != 0 {
            flags
        } else {
            0
        }
    }

    /// The epoll events the host socket should be watched for, or `None` to not watch it.
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

    fn header(&mut self, guest_cid: u64, op: u16, flags: u32) -> Header {
        // Every packet carries our credit, so no separate update is due after it.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !bit(op::CREDIT_UPDATE);
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Put the next packet for the guest into `pkt`: control packets first, then data
    /// read straight from the host socket into guest memory, then SHUTDOWN.
    pub(crate) fn fill_rx(&mut self, pkt: &mut Pkt<'_>, guest_cid: u64) -> Fill {
        if let Some(op) = PENDING_ORDER
            .into_iter()
            .find(|op| self.pending & bit(*op) != 0)
        {
            self.pending &= !bit(op);
            self.header(guest_cid, op, 0).write_to(pkt, 0);
            return Fill::Sent(0);
        }
        if self.can_send_data() {
            match self.read_host(pkt) {
                Ok(0) => {}
                Ok(n) => {
                    self.tx_cnt += Wrapping(n);
                    if self.peer_credit() == 0 && !self.credit_requested {
                        self.credit_requested = true;
                        self.pending |= bit(op::CREDIT_REQUEST);
                    }
                    self.header(guest_cid, op::RW, 0).write_to(pkt, n);
                    return Fill::Sent(n);
                }
                Err(_) => return Fill::Failed,
            }
        }
        let flags = self.shutdown_due();
        if flags != 0 {
            self.shutdown_sent |= flags;
            self.header(guest_cid, op::SHUTDOWN, flags).write_to(pkt, 0);
            return Fill::Sent(0);
        }
        Fill::Nothing
    }

    /// Read up to the guest's credit from the host socket into the packet's data buffer.
    /// Returns the byte count (0 when nothing was there or at end of stream).
    fn read_host(&mut self, pkt: &Pkt<'_>) -> io::Result<u32> {
        let Some(data) = pkt.data_slice() else {
            return Ok(0);
        };
        let room = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let max = self.peer_credit().min(room).min(MAX_PKT_DATA) as usize;
        let mut buf = data.subslice(0, max).map_err(io::Error::other)?;
        loop {
            match self.stream.read_volatile(&mut buf) {
                Ok(0) => {
                    self.host_eof = true;
                    self.host_readable = false;
                    return Ok(0);
                }
                // `n <= max <= MAX_PKT_DATA`.
                Ok(n) => return Ok(u32::try_from(n).unwrap_or(0)),
                Err(VolatileMemoryError::IOError(e)) => match e.kind() {
                    io::ErrorKind::WouldBlock => {
                        self.host_readable = false;
                        return Ok(0);
                    }
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(e),
                },
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    }
}
