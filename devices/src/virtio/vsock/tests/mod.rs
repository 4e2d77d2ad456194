//! Tests of the vsock device against virtio-queue's mock guest memory and real Unix sockets.
//!
//! The harness plays the guest driver (it writes descriptor chains and reads the used
//! rings) and the event loop: [`Harness::run`] polls every fd the device registered and
//! calls the device's handler for each ready one until nothing is ready, so tests never
//! sleep; a device that keeps a ready fd registered without making progress fails the run.

mod driver;
mod guest;
mod host;
mod lifecycle;
mod robust;

use driver::{GuestQueue, Hdr, RxPkt, QSIZE};

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{op, Vsock, VsockRestoreArgs, EVQ, HOST_CID, RXQ, TXQ};
use crate::persist::Persist;
use crate::virtio::interest::fake::FakeEpoll;
use crate::virtio::{Activation, GuestMemory, QueueRestoreArgs, VirtioDevice, VirtioInterrupt};

pub(super) const GUEST_CID: u64 = 3;

const MEM_SIZE: usize = 16 << 20;

pub(super) use crate::virtio::test_dir::TestDir;

pub(super) fn test_mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

pub(super) struct Harness<'m> {
    pub mem: &'m GuestMemory,
    pub dev: Vsock,
    pub ep: FakeEpoll,
    pub path: PathBuf,
    pub dir: TestDir,
    pub rx: GuestQueue<'m>,
    pub tx: GuestQueue<'m>,
    pub ev: GuestQueue<'m>,
    kicks: Vec<EventFd>,
    pub irq: VirtioInterrupt,
}

impl<'m> Harness<'m> {
    /// A device, registered with the fake epoll, not yet activated.
    pub(super) fn inactive(mem: &'m GuestMemory) -> Self {
        let dir = TestDir::new("vsock");
        let path = dir.0.join("v.sock");
        let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
        let mut ep = FakeEpoll::default();
        dev.sync_interest(&mut ep);
        Self {
            mem,
            dev,
            ep,
            path,
            dir,
            rx: GuestQueue::new(mem, 0x0, 0x10_0000, 0x60_0000),
            tx: GuestQueue::new(mem, 0x1_0000, 0x70_0000, 0x60_0000),
            ev: GuestQueue::new(mem, 0x2_0000, 0xd0_0000, 0x1_0000),
            kicks: Vec::new(),
            irq: VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        }
    }

    /// A device the "driver" has activated, its queue eventfds registered.
    pub(super) fn new(mem: &'m GuestMemory) -> Self {
        Self::activated(mem, false)
    }

    /// Like [`Harness::new`], with VIRTIO_RING_F_EVENT_IDX in use or not.
    pub(super) fn activated(mem: &'m GuestMemory, event_idx: bool) -> Self {
        let mut h = Self::inactive(mem);
        let evts: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        h.kicks = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        let mut queues = vec![h.rx.queue(), h.tx.queue(), h.ev.queue()];
        for q in &mut queues {
            q.set_event_idx(event_idx);
        }
        h.dev
            .activate(Activation::new(mem.clone(), queues, evts, h.irq.clone()))
            .unwrap();
        h.run();
        assert_eq!(h.ep.fds.len(), 5, "wake, listener and three queue eventfds");
        h
    }

    /// Replaces the device with one restored from its own snapshot state (listening on
    /// `sock` in the same directory), as a restored VM's is: same queues in the same guest
    /// memory, new queue eventfds, a fresh event loop.
    pub(super) fn restore_in_place(&mut self, sock: &str) {
        let state = self.dev.save();
        let evts: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        self.kicks = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        self.path = self.dir.0.join(sock);
        let args = VsockRestoreArgs {
            uds_path: self.path.clone(),
            queues: QueueRestoreArgs {
                mem: self.mem.clone(),
                queue_evts: evts,
                interrupt: self.irq.clone(),
            },
        };
        self.dev = Vsock::restore(args, &state).unwrap();
        self.ep = FakeEpoll::default();
        self.dev.sync_interest(&mut self.ep);
        self.run();
    }

    /// Play the event loop until no registered fd is ready.
    pub(super) fn run(&mut self) {
        for _ in 0..10_000 {
            let ready = self.ep.ready().expect("poll");
            if ready.is_empty() {
                assert_eq!(self.ep.errors, 0, "epoll bookkeeping error");
                return;
            }
            for (fd, set) in ready {
                self.dev.handle_event(fd, set);
                self.dev.sync_interest(&mut self.ep);
            }
        }
        panic!("the device keeps fds ready without making progress");
    }

    fn kick(&mut self, q: usize) {
        self.kicks[q].write(1).unwrap();
        self.run();
    }

    /// Put a packet on the tx queue (header and payload in separate descriptors, as Linux
    /// does) and let the device process it.
    pub(super) fn send(&mut self, hdr: Hdr, payload: &[u8]) {
        self.queue_tx(hdr, payload);
        self.kick(TXQ);
    }

    /// Put a packet on the tx queue without kicking the device.
    pub(super) fn queue_tx(&mut self, hdr: Hdr, payload: &[u8]) {
        let len = u32::try_from(payload.len()).unwrap();
        let h = self.tx.alloc(44);
        self.mem
            .write_slice(&hdr.encode(len), GuestAddress(h))
            .unwrap();
        if payload.is_empty() {
            self.tx.add_chain(&[(h, 44, false)]);
        } else {
            let d = self.tx.alloc(u64::from(len));
            self.mem.write_slice(payload, GuestAddress(d)).unwrap();
            self.tx.add_chain(&[(h, 44, false), (d, len, false)]);
        }
    }

    /// Add a raw tx chain (for malformed ones) and kick.
    pub(super) fn send_raw(&mut self, descs: &[(u64, u32, bool)]) {
        self.tx.add_chain(descs);
        self.kick(TXQ);
    }

    /// Post `n` single-descriptor rx buffers with room for `data` payload bytes each.
    pub(super) fn post_rx(&mut self, n: usize, data: u32) {
        for _ in 0..n {
            let a = self.rx.alloc(u64::from(44 + data));
            self.rx.add_chain(&[(a, 44 + data, true)]);
        }
        self.kick(RXQ);
    }

    /// Post an event-queue buffer of `len` bytes.
    pub(super) fn post_event_buf(&mut self, len: u32) -> u64 {
        let a = self.ev.alloc(u64::from(len));
        self.mem.write_slice(&[0xaa; 4], GuestAddress(a)).unwrap();
        self.ev.add_chain(&[(a, len, true)]);
        self.kick(EVQ);
        a
    }

    /// Packets the device has put into rx buffers since the last call.
    pub(super) fn rx_packets(&mut self) -> Vec<RxPkt> {
        self.rx
            .used()
            .into_iter()
            .map(|(_, used_len, addr)| RxPkt::read(self.mem, addr, used_len))
            .collect()
    }

    /// A host client that has sent `CONNECT port` and been accepted by the guest (which
    /// advertised `buf_alloc`). Returns the client and the host-side port.
    pub(super) fn connect_from_host(&mut self, port: u32, buf_alloc: u32) -> (UnixStream, u32) {
        let mut client = UnixStream::connect(&self.path).unwrap();
        client.set_nonblocking(true).unwrap();
        std::io::Write::write_all(&mut client, format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.post_rx(1, 4096);
        let req = self.rx_packets();
        assert_eq!(req.len(), 1, "{req:?}");
        assert_eq!(req[0].op, op::REQUEST);
        assert_eq!(req[0].dst_port, port);
        let local = req[0].src_port;
        let mut resp = Hdr::new(op::RESPONSE, port, local);
        resp.buf_alloc = buf_alloc;
        self.send(resp, &[]);
        let (line, eof) = read_available(&mut client);
        assert!(!eof);
        assert_eq!(String::from_utf8(line).unwrap(), format!("OK {local}\n"));
        (client, local)
    }
}

/// Everything the socket has now, and whether it reached end of stream.
pub(super) fn read_available(s: &mut UnixStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (out, false),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return (out, true),
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// The socket's fd as the device sees its own end: used to assert epoll interest.
pub(super) fn conn_fd(h: &Harness<'_>, local: u32, peer: u32) -> i32 {
    h.dev.muxer.conns[&(local, peer)].stream.as_raw_fd()
}

/// Payload bytes in a run of RW packets.
pub(super) fn rw_bytes(pkts: &[RxPkt]) -> Vec<u8> {
    pkts.iter()
        .filter(|p| p.op == op::RW)
        .flat_map(|p| p.data.iter().copied())
        .collect()
}
