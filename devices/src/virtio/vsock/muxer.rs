//! The connection table: routes guest packets to connections, host socket events to
//! connections, and chooses what goes into the next rx buffer.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::EventSet;
use tracing::{debug, info, warn};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, Fill};
use super::packet_io::{Header, RxPkt, TxPkt};
use super::unix::{self, Handshake, PendingClient};
use super::{op, VsockError, HOST_CID, MAX_CONNECTIONS, MAX_PENDING_RESETS, TYPE_STREAM};

/// (host-side port, guest-side port).
pub(crate) type ConnKey = (u32, u32);

/// First host-side port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// A reset for a packet that matched no connection (or for one we kill).
#[derive(Debug, Clone, Copy)]
struct Reset {
    src_cid: u64,
    src_port: u32,
    dst_port: u32,
}

pub(crate) struct Muxer {
    uds_path: PathBuf,
    listener: UnixListener,
    guest_cid: u64,
    pub(crate) conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    pending: HashMap<RawFd, PendingClient>,
    rx_ready: VecDeque<ConnKey>,
    resets: VecDeque<Reset>,
    /// Closed sockets, kept open until they have left the epoll set.
    retired: Vec<UnixStream>,
    next_local_port: u32,
    /// Ticks while host clients are in their handshake (in the epoll set only then), so
    /// that one that never sends its `CONNECT` line is dropped after the timeout. Armed
    /// once, periodic, so the event loop never re-arms it (no timer syscalls at run time).
    tick: TimerFd,
    pub(crate) handshake_timeout: Duration,
    /// Who may connect besides what the socket's mode allows.
    pub(crate) peers: crate::private::PeerPolicy,
}

/// The period of [`Muxer::tick`].
const TICK: Duration = Duration::from_secs(1);

impl Drop for Muxer {
    /// The listening socket's file goes with the device, so no stale socket is left behind.
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            debug!("vsock: cannot remove {}: {e}", self.uds_path.display());
        }
    }
}

impl Muxer {
    pub(crate) fn new(uds_path: PathBuf, guest_cid: u64) -> Result<Self, VsockError> {
        let listener = unix::bind_listener(&uds_path)?;
        let timer_err = |e: vmm_sys_util::errno::Error| VsockError::EventFd(e.into());
        let mut tick = TimerFd::new().map_err(timer_err)?;
        tick.reset(TICK, Some(TICK)).map_err(timer_err)?;
        // Non-blocking, so that reading it can never stall the event loop.
        // SAFETY: fcntl on the timer's own open fd, with integer arguments only.
        let nonblocking = unsafe {
            let fd = tick.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        if !nonblocking {
            return Err(VsockError::EventFd(std::io::Error::last_os_error()));
        }
        Ok(Self {
            uds_path,
            listener,
            guest_cid,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            pending: HashMap::new(),
            rx_ready: VecDeque::new(),
            resets: VecDeque::new(),
            retired: Vec::new(),
            next_local_port: FIRST_LOCAL_PORT,
            tick,
            handshake_timeout: unix::HANDSHAKE_TIMEOUT,
            peers: crate::private::PeerPolicy::default(),
        })
    }

    pub(crate) fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    pub(crate) fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    fn accepting(&self) -> bool {
        self.conns.len() + self.pending.len() < MAX_CONNECTIONS
    }

    /// Add what the host sockets want to `out`.
    pub(crate) fn interest(&self, out: &mut Vec<(RawFd, EventSet)>) {
        if self.accepting() {
            out.push((self.listener_fd(), EventSet::IN));
        }
        out.extend(self.pending.keys().map(|fd| (*fd, EventSet::IN)));
        if !self.pending.is_empty() {
            out.push((self.tick.as_raw_fd(), EventSet::IN));
        }
        for conn in self.conns.values() {
            if let Some(set) = conn.interest() {
                out.push((conn.stream.as_raw_fd(), set));
            }
        }
    }

    /// Sockets that may be closed once they are out of the epoll set.
    pub(crate) fn take_retired(&mut self) -> Vec<UnixStream> {
        std::mem::take(&mut self.retired)
    }

    /// Drop every connection (device reset, transport reset). Host clients see EOF.
    pub(crate) fn reset(&mut self) {
        for (_, conn) in self.conns.drain() {
            self.retired.push(conn.stream);
        }
        self.by_fd.clear();
        self.rx_ready.clear();
        self.resets.clear();
    }

    pub(crate) fn has_rx_work(&self) -> bool {
        !self.resets.is_empty() || !self.rx_ready.is_empty()
    }

    /// New host clients on the listener.
    pub(crate) fn accept(&mut self) {
        while self.accepting() {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(why) = self.peers.allows(&stream) {
                        warn!(
                            "vsock: refusing a host client on {}: {why}",
                            self.uds_path.display()
                        );
                        self.retired.push(stream);
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        warn!("vsock: cannot make a host client non-blocking: {e}");
                        continue;
                    }
                    self.pending
                        .insert(stream.as_raw_fd(), PendingClient::new(stream));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!("vsock: accept on {} failed: {e}", self.uds_path.display());
                    break;
                }
            }
        }
    }

    /// An event on a host socket that is not the listener.
    pub(crate) fn on_host_event(&mut self, fd: RawFd, set: EventSet) {
        if fd == self.tick.as_raw_fd() {
            // Non-blocking: drains the expirations, if any.
            let _ = self.tick.wait();
            self.expire_pending(Instant::now());
            return;
        }
        if let Some(client) = self.pending.get_mut(&fd) {
            match client.poll() {
                Handshake::Pending => {}
                Handshake::Connect(port) => {
                    if let Some(client) = self.pending.remove(&fd) {
                        self.connect_to_guest(client.stream, port);
                    }
                }
                Handshake::Refused(why) => {
                    info!("vsock: closing host client: {why}");
                    if let Some(client) = self.pending.remove(&fd) {
                        self.retired.push(client.stream);
                    }
                }
            }
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return; // Stale event for a socket closed earlier in this batch.
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            if let Err(e) = conn.on_host_event(set) {
                debug!(?key, "vsock: resetting connection: {e}");
                self.kill(key, true);
                return;
            }
        }
        self.touch(key);
    }

    /// Drops the host clients that have not sent their `CONNECT` line in time.
    pub(crate) fn expire_pending(&mut self, now: Instant) {
        let timeout = self.handshake_timeout;
        let late: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, c)| c.expired(now, timeout))
            .map(|(fd, _)| *fd)
            .collect();
        for fd in late {
            if let Some(client) = self.pending.remove(&fd) {
                info!("vsock: closing host client: no CONNECT line within {timeout:?}");
                self.retired.push(client.stream);
            }
        }
    }

    /// The number of host clients still in their handshake.
    #[cfg(test)]
    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    fn connect_to_guest(&mut self, stream: UnixStream, peer_port: u32) {
        let Some(local_port) = self.alloc_local_port(peer_port) else {
            warn!("vsock: no free host port; closing host client");
            self.retired.push(stream);
            return;
        };
        debug!(
            local_port,
            peer_port, "vsock: host client connecting to the guest"
        );
        self.insert(Connection::host_initiated(stream, local_port, peer_port));
    }

    /// The host-side port the next host-initiated connection gets (for the snapshot).
    pub(crate) fn next_local_port(&self) -> u32 {
        self.next_local_port
    }

    /// Carries on handing out host-side ports from `port`, as the device that was
    /// snapshotted would have; a port below the host range starts the range again.
    pub(crate) fn continue_local_ports_at(&mut self, port: u32) {
        self.next_local_port = port.max(FIRST_LOCAL_PORT);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return Some(port);
            }
        }
        None
    }

    fn insert(&mut self, conn: Connection) {
        let key = (conn.local_port, conn.peer_port);
        self.by_fd.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.touch(key);
    }

    /// Remove a connection, resetting the guest's end if `rst`.
    fn kill(&mut self, key: ConnKey, rst: bool) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        self.by_fd.remove(&conn.stream.as_raw_fd());
        self.retired.push(conn.stream);
        if rst {
            self.resets.push_back(Reset {
                src_cid: HOST_CID,
                src_port: key.0,
                dst_port: key.1,
            });
        }
    }

    /// After any change to a connection: close it if it is done, queue it if it has
    /// something for the guest.
    fn touch(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.finished() {
            debug!(?key, "vsock: connection closed");
            self.kill(key, true);
            return;
        }
        if !conn.queued && conn.has_rx_work() {
            conn.queued = true;
            self.rx_ready.push_back(key);
        }
    }

    fn reset_reply(&mut self, pkt: &TxPkt<'_>) {
        if pkt.op() == op::RST {
            return;
        }
        if self.resets.len() >= MAX_PENDING_RESETS {
            debug!("vsock: reset queue full; dropping a reset");
            return;
        }
        self.resets.push_back(Reset {
            src_cid: pkt.dst_cid(),
            src_port: pkt.dst_port(),
            dst_port: pkt.src_port(),
        });
    }

    /// A packet from the guest's tx queue.
    pub(crate) fn on_guest_packet(&mut self, pkt: &TxPkt<'_>) {
        if pkt.src_cid() != self.guest_cid {
            warn!(
                src_cid = pkt.src_cid(),
                "vsock: dropping a packet with a foreign source CID"
            );
            return;
        }
        if pkt.type_() != TYPE_STREAM || pkt.dst_cid() != HOST_CID {
            debug!(
                type_ = pkt.type_(),
                dst_cid = pkt.dst_cid(),
                "vsock: refusing a non-stream or non-host packet"
            );
            self.reset_reply(pkt);
            return;
        }
        let key = (pkt.dst_port(), pkt.src_port());
        let Some(conn) = self.conns.get_mut(&key) else {
            match pkt.op() {
                op::REQUEST => self.guest_connect(pkt),
                op::RST => {}
                _ => self.reset_reply(pkt),
            }
            return;
        };
        conn.update_peer_credit(pkt.buf_alloc(), pkt.fwd_cnt());
        let result = match pkt.op() {
            op::RESPONSE => conn.on_response(),
            op::RW => conn.on_rw(pkt.data_slice()),
            op::SHUTDOWN => {
                conn.on_shutdown(pkt.flags());
                Ok(())
            }
            op::CREDIT_REQUEST => {
                conn.on_credit_request();
                Ok(())
            }
            op::CREDIT_UPDATE => Ok(()),
            op::RST => {
                debug!(?key, "vsock: guest reset the connection");
                self.kill(key, false);
                return;
            }
            other => Err(super::connection::ConnError::Protocol(other)),
        };
        if let Err(e) = result {
            debug!(?key, "vsock: resetting connection: {e}");
            self.kill(key, true);
            return;
        }
        self.touch(key);
    }

    /// The guest connects to host port `dst_port`: connect `P_<dst_port>`.
    fn guest_connect(&mut self, pkt: &TxPkt<'_>) {
        let (local, peer) = (pkt.dst_port(), pkt.src_port());
        if self.conns.len() >= MAX_CONNECTIONS {
            warn!(
                port = local,
                "vsock: too many connections; refusing the guest's"
            );
            self.reset_reply(pkt);
            return;
        }
        let path = unix::host_port_path(&self.uds_path, local);
        match unix::connect_nonblocking(&path) {
            Ok(stream) => {
                debug!(local, peer, "vsock: guest connected to {}", path.display());
                let mut conn = Connection::guest_initiated(stream, local, peer);
                conn.update_peer_credit(pkt.buf_alloc(), pkt.fwd_cnt());
                self.insert(conn);
            }
            Err(e) => {
                debug!(
                    port = local,
                    "vsock: nothing accepts on {}: {e}",
                    path.display()
                );
                self.reset_reply(pkt);
            }
        }
    }

    /// Fill one rx buffer: pending resets first, then connections in turn. Returns the
    /// payload length, or `None` if there was nothing to send after all.
    pub(crate) fn fill_rx(&mut self, pkt: &mut RxPkt<'_>) -> Option<u32> {
        // Each queued connection gets one look: one that cannot use this buffer (no room
        // for data) goes to the back rather than round and round.
        let mut looks = self.rx_ready.len();
        loop {
            if let Some(r) = self.resets.pop_front() {
                let hdr = Header {
                    src_cid: r.src_cid,
                    dst_cid: self.guest_cid,
                    src_port: r.src_port,
                    dst_port: r.dst_port,
                    op: op::RST,
                    ..Header::default()
                };
                hdr.write_to(pkt, 0);
                return Some(0);
            }
            looks = looks.checked_sub(1)?;
            let key = self.rx_ready.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            match conn.fill_rx(pkt, self.guest_cid) {
                Fill::Sent(n) => {
                    self.touch(key);
                    return Some(n);
                }
                Fill::Nothing => self.touch(key),
                Fill::Failed => self.kill(key, true),
            }
        }
    }
}
