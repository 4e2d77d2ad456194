//! Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`, off by default):
//! the device's own queue walking ([`drain_tx`], [`fill_rx`]) and a whole activated device
//! driven from the guest's side of its queues and from host sockets ([`Harness`]).
//! Not an API.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

use virtio_queue::{Queue, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::packet_io::{self, Header};
use super::{Vsock, EVQ, RXQ, TXQ};
use crate::virtio::interest::fake::FakeEpoll;
use crate::virtio::test_dir::TestDir;
use crate::virtio::{Activation, GuestMemory, VirtioDevice, VirtioInterrupt};

fn interrupt() -> VirtioInterrupt {
    VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
}

/// Pops every available tx chain as the device does (one payload descriptor, else the
/// payload gathered from several) and hands each packet that parses to `handle`.
pub fn drain_tx(queue: &mut Queue, mem: &GuestMemory, handle: impl FnMut(&VsockPacket<'_, ()>)) {
    let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    packet_io::drain_tx(queue, mem, &evt, &interrupt(), handle);
}

/// Fills rx chains as the device does, one packet per entry of `payloads` (its payload
/// length, capped by the buffer's room), until they run out or the queue does.
pub fn fill_rx(queue: &mut Queue, mem: &GuestMemory, payloads: &[u32]) {
    let mut next = 0;
    let more = std::cell::Cell::new(0);
    packet_io::fill_rx(
        queue,
        mem,
        &interrupt(),
        || more.get() < payloads.len(),
        |pkt| {
            let want = payloads[next];
            next += 1;
            more.set(next);
            let room = pkt.data_slice().map_or(0, |d| d.len());
            let n = u32::try_from(room).unwrap_or(u32::MAX).min(want);
            Header {
                op: super::op::RW,
                ..Header::default()
            }
            .write_to(pkt, n);
            Some(n)
        },
    );
    let _ = queue.enable_notification(mem);
}

/// A split virtqueue as the guest driver sees it, laid out in guest memory.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    /// Buffers for this queue's descriptors: a window of guest memory used round robin.
    buf_base: u64,
    buf_len: u64,
    buf_off: u64,
}

impl Ring {
    fn new(base: u64, buf_base: u64, buf_len: u64) -> Self {
        Ring {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            size: QSIZE,
            next_desc: 0,
            avail_idx: 0,
            buf_base,
            buf_len,
            buf_off: 0,
        }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        let split = |a: u64| (Some((a & 0xffff_ffff) as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.desc);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        q
    }

    fn alloc(&mut self, len: u64) -> u64 {
        if self.buf_off + len > self.buf_len {
            self.buf_off = 0;
        }
        let addr = self.buf_base + self.buf_off;
        self.buf_off += len.div_ceil(16) * 16;
        addr
    }

    /// Makes `(addr, len, device_writable)` descriptors one available chain.
    fn add_chain(&mut self, mem: &GuestMemory, descs: &[(u64, u32, bool)]) {
        let n = u16::try_from(descs.len())
            .unwrap_or(u16::MAX)
            .min(self.size);
        if n == 0 {
            return;
        }
        if self.next_desc + n > self.size {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        for (i, &(addr, len, write)) in (0..n).zip(descs) {
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            let mut next = 0;
            if i + 1 < n {
                flags |= VRING_DESC_F_NEXT;
                next = head + i + 1;
            }
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            let at = self.desc + 16 * u64::from(head + i);
            mem.write_slice(&raw, GuestAddress(at)).expect("desc table");
        }
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .expect("avail idx");
        self.next_desc += n;
    }
}

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const QSIZE: u16 = 256;
const MEM_SIZE: usize = 4 << 20;
/// The host port a listener waits on in every harness: guest connections to it succeed.
pub const LISTEN_PORT: u32 = 5000;
/// The guest's CID in every harness.
pub const GUEST_CID: u64 = 3;
/// Connections the harness keeps on the host side; further ones are closed.
const MAX_HOST_STREAMS: usize = 16;

/// An activated vsock device with its three queues in guest memory, a fake epoll set and
/// an event loop stand-in; host clients and a listener for [`LISTEN_PORT`].
pub struct Harness {
    mem: GuestMemory,
    dev: Vsock,
    ep: FakeEpoll,
    /// Where the device's sockets are; removed with the harness.
    _dir: TestDir,
    kicks: Vec<EventFd>,
    rings: [Ring; 3],
    listener: UnixListener,
    /// Host-side streams: clients of the device's socket and accepted guest connections.
    streams: Vec<UnixStream>,
    /// Bytes the host side has read from its streams.
    received: usize,
}

impl Harness {
    /// A device the driver has activated (with VIRTIO_RING_F_EVENT_IDX or not).
    pub fn new(event_idx: bool) -> Self {
        let dir = TestDir::new("vsock-fuzz");
        let path = dir.path("v.sock");
        let listener = UnixListener::bind(super::unix::host_port_path(&path, LISTEN_PORT))
            .expect("host listener");
        listener.set_nonblocking(true).expect("nonblocking");
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("memory");
        let mut dev = Vsock::new(GUEST_CID, &path).expect("vsock device");
        let mut ep = FakeEpoll::default();
        dev.sync_interest(&mut ep);
        let rings = [
            Ring::new(0x0, 0x10_0000, 0x10_0000),
            Ring::new(0x1_0000, 0x20_0000, 0x18_0000),
            Ring::new(0x2_0000, 0x38_0000, 0x1_0000),
        ];
        let evts: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
            .collect();
        let kicks = evts
            .iter()
            .map(|e| e.try_clone().expect("eventfd"))
            .collect();
        let mut queues: Vec<Queue> = rings.iter().map(Ring::queue).collect();
        for q in &mut queues {
            q.set_event_idx(event_idx);
        }
        dev.activate(Activation::new(mem.clone(), queues, evts, interrupt()))
            .expect("activate");
        let mut h = Harness {
            mem,
            dev,
            ep,
            _dir: dir,
            kicks,
            rings,
            listener,
            streams: Vec::new(),
            received: 0,
        };
        h.run();
        h
    }

    /// Puts a tx packet on the queue without kicking: the 44-byte `header`, then `payload`
    /// split into descriptors of at most `piece` bytes (0: all in the header's descriptor).
    pub fn queue_tx(&mut self, header: &[u8; 44], payload: &[u8], piece: usize) {
        let ring = &mut self.rings[TXQ];
        let total = 44 + payload.len() as u64;
        let base = ring.alloc(total);
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(payload);
        if self.mem.write_slice(&bytes, GuestAddress(base)).is_err() {
            return;
        }
        let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let mut descs = Vec::new();
        if piece == 0 {
            descs.push((base, len(bytes.len()), false));
        } else {
            descs.push((base, 44, false));
            for (i, chunk) in payload.chunks(piece).enumerate() {
                descs.push((base + 44 + (i * piece) as u64, len(chunk.len()), false));
            }
        }
        ring.add_chain(&self.mem, &descs);
    }

    /// Posts `n` single-descriptor rx buffers with room for `room` payload bytes each.
    pub fn post_rx(&mut self, n: usize, room: u32) {
        let ring = &mut self.rings[RXQ];
        for _ in 0..n {
            let a = ring.alloc(u64::from(44 + room));
            ring.add_chain(&self.mem, &[(a, 44 + room, true)]);
        }
    }

    /// Posts one event-queue buffer of `len` bytes.
    pub fn post_event(&mut self, len: u32) {
        let ring = &mut self.rings[EVQ];
        let a = ring.alloc(u64::from(len));
        ring.add_chain(&self.mem, &[(a, len, true)]);
    }

    /// Kicks queue `q` (0 rx, 1 tx, 2 event) and runs the event loop.
    pub fn kick(&mut self, q: usize) {
        if let Some(k) = self.kicks.get(q) {
            let _ = k.write(1);
        }
        self.run();
    }

    /// A host client connects to the device's socket and sends `line` (e.g. `CONNECT 52\n`).
    pub fn host_connect(&mut self, line: &[u8]) {
        if self.streams.len() >= MAX_HOST_STREAMS {
            return;
        }
        if let Ok(mut s) = UnixStream::connect(self.dev.uds_path()) {
            let _ = s.set_nonblocking(true);
            let _ = s.write(line);
            self.streams.push(s);
        }
        self.run();
    }

    /// Host stream `i` (modulo their number) writes `data`.
    pub fn host_write(&mut self, i: usize, data: &[u8]) {
        if let Some(n) = self.streams.len().checked_sub(1) {
            let _ = self.streams[i % (n + 1)].write(data);
        }
        self.run();
    }

    /// Host stream `i` (modulo their number) closes.
    pub fn host_close(&mut self, i: usize) {
        if !self.streams.is_empty() {
            let n = self.streams.len();
            self.streams.swap_remove(i % n);
        }
        self.run();
    }

    /// The VMM's transport reset (as after a restore).
    pub fn transport_reset(&mut self) {
        let _ = self.dev.send_transport_reset();
        self.run();
    }

    /// Plays the event loop until no registered fd is ready; the host side accepts guest
    /// connections and reads (discards) what arrives. Panics if the device keeps an fd
    /// ready without making progress, or its epoll bookkeeping goes wrong.
    pub fn run(&mut self) {
        let mut buf = [0u8; 4096];
        for _ in 0..1000 {
            while let Ok((s, _)) = self.listener.accept() {
                if self.streams.len() < MAX_HOST_STREAMS {
                    let _ = s.set_nonblocking(true);
                    self.streams.push(s);
                }
            }
            for s in &mut self.streams {
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    self.received += n;
                }
            }
            let ready = match self.ep.ready() {
                Ok(ready) => ready,
                // libFuzzer's SIGALRM (its timeout check) interrupts poll now and then.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("poll: {e}"),
            };
            assert_eq!(self.ep.errors, 0, "epoll bookkeeping error");
            if ready.is_empty() {
                return;
            }
            for (fd, set) in ready {
                self.dev.handle_event(fd, set);
                self.dev.sync_interest(&mut self.ep);
            }
        }
        panic!("the vsock device keeps fds ready without making progress");
    }
}

impl Harness {
    /// Bytes the host side has received so far (the guest's data and `OK <port>` lines).
    pub fn host_received(&self) -> usize {
        self.received
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::{op, HOST_CID};

    fn header(op: u16, len: u32) -> [u8; 44] {
        let mut b = [0u8; 44];
        b[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
        b[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
        b[16..20].copy_from_slice(&1024u32.to_le_bytes());
        b[20..24].copy_from_slice(&LISTEN_PORT.to_le_bytes());
        b[24..28].copy_from_slice(&len.to_le_bytes());
        b[28..30].copy_from_slice(&1u16.to_le_bytes());
        b[30..32].copy_from_slice(&op.to_le_bytes());
        b[36..40].copy_from_slice(&65536u32.to_le_bytes());
        b
    }

    /// The harness reaches the connection logic: a guest connection to the listening port
    /// is made and its data arrives on the host side, whole or split over descriptors.
    #[test]
    fn guest_data_reaches_the_host_listener() {
        let mut h = Harness::new(false);
        h.post_rx(4, 4096);
        h.kick(RXQ);
        h.queue_tx(&header(op::REQUEST, 0), &[], 0);
        h.kick(TXQ);
        h.queue_tx(&header(op::RW, 1000), &[7; 1000], 0);
        h.queue_tx(&header(op::RW, 1000), &[8; 1000], 300);
        h.kick(TXQ);
        assert_eq!(h.host_received(), 2000);
    }
}
