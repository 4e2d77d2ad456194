//! The host → guest direction: credit, and what goes into the next rx buffer.

use std::io;
use std::num::Wrapping;

use vm_memory::{ReadVolatile, VolatileMemoryError};

use super::{bit, Connection, Fill, State, PENDING_ORDER};
use crate::virtio::vsock::packet_io::{Header, RxPkt};
use crate::virtio::vsock::{
    op, CONN_BUF_ALLOC, HOST_CID, MAX_PKT_DATA, SHUTDOWN_RCV, SHUTDOWN_SEND,
};

impl Connection {
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
    pub(crate) fn fill_rx(&mut self, pkt: &mut RxPkt<'_>, guest_cid: u64) -> Fill {
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
    fn read_host(&mut self, pkt: &RxPkt<'_>) -> io::Result<u32> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn conn() -> Connection {
        let (a, _b) = UnixStream::pair().unwrap();
        Connection::guest_initiated(a, 52, 5000)
    }

    #[test]
    fn credit_counters_wrap() {
        let mut c = conn();
        c.tx_cnt = Wrapping(u32::MAX - 10);
        c.update_peer_credit(100, u32::MAX - 50);
        assert_eq!(c.peer_credit(), 60);
        // 30 more bytes sent: tx_cnt wraps past zero.
        c.tx_cnt += Wrapping(30);
        assert_eq!(c.tx_cnt.0, 19);
        assert_eq!(c.peer_credit(), 30);
        c.update_peer_credit(100, 19);
        assert_eq!(c.peer_credit(), 100);
    }

    #[test]
    fn bogus_peer_counters_give_no_credit() {
        let mut c = conn();
        c.tx_cnt = Wrapping(1000);
        // The guest claims to have consumed more than was ever sent.
        c.update_peer_credit(4096, 5000);
        assert_eq!(c.peer_credit(), 0);
        c.update_peer_credit(u32::MAX, 0);
        assert_eq!(c.peer_credit(), u32::MAX - 1000);
        c.update_peer_credit(0, 1000);
        assert_eq!(c.peer_credit(), 0);
    }
}
