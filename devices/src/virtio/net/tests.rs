//! Tests of the network device against virtio-queue's mock guest memory, with a
//! SOCK_SEQPACKET socket pair standing in for the TAP (it keeps frame boundaries, as a TAP
//! does). The harness plays the guest driver, the host side of the TAP and the event loop.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::persist::Persist;
use crate::virtio::test_queue::{GuestQueue, F_NEXT, F_WRITE};
use crate::virtio::{Activation, GuestMemory, QueueRestoreArgs, VirtioDevice, VirtioInterrupt};

const MEM_SIZE: usize = 16 << 20;
const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 9]);

fn test_mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A connected, nonblocking SOCK_SEQPACKET pair: (device end as a Tap, host end).
fn fake_tap() -> (Tap, File) {
    let mut fds = [0; 2];
    let kind = libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) };
    assert_eq!(rc, 0);
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (dev, host) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    (Tap::from_file(dev, "faketap0"), host)
}

/// A frame with a vnet header whose fields are all `hdr_fill`, and a payload from `seed`.
fn frame(len: usize, seed: u8, hdr_fill: u8) -> Vec<u8> {
    let mut f = vec![hdr_fill; VNET_HDR_LEN];
    f.extend((0..len).map(|i| u8::try_from(i % 253).unwrap() ^ seed));
    f
}

struct Harness<'m> {
    mem: &'m GuestMemory,
    dev: Net,
    host: File,
    rx: GuestQueue<'m>,
    tx: GuestQueue<'m>,
    kicks: [EventFd; 2],
    irq: VirtioInterrupt,
}

impl<'m> Harness<'m> {
    fn new(mem: &'m GuestMemory) -> Self {
        Self::with_event_idx(mem, false)
    }

    fn with_event_idx(mem: &'m GuestMemory, event_idx: bool) -> Self {
        let (tap, host) = fake_tap();
        Self::activate(mem, Net::new(tap, MAC).unwrap(), host, event_idx)
    }

    fn activate(mem: &'m GuestMemory, mut dev: Net, host: File, event_idx: bool) -> Self {
        let rx = GuestQueue::new(mem, 0x0, 0x10_0000, 0x40_0000);
        let tx = GuestQueue::new(mem, 0x1_0000, 0x50_0000, 0x40_0000);
        let (mut rxq, mut txq) = (rx.queue(), tx.queue());
        rxq.set_event_idx(event_idx);
        txq.set_event_idx(event_idx);
        let evts = [(); 2].map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let kicks = [0, 1].map(|i| evts[i].try_clone().unwrap());
        let irq = VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        dev.ack_features(dev.device_features());
        dev.activate(Activation::new(
            mem.clone(),
            vec![rxq, txq],
            evts.into(),
            irq.clone(),
        ))
        .unwrap();
        Self {
            mem,
            dev,
            host,
            rx,
            tx,
            kicks,
            irq,
        }
    }

    /// Kick queue `index` and let the device handle it.
    fn kick(&mut self, index: usize) {
        self.kicks[index].write(1).unwrap();
        let fd = self.dev.queues.queue_fd(index).unwrap();
        self.dev.handle_event(fd);
    }

    /// The guest sends `data` split over descriptors of `split` bytes.
    fn send(&mut self, data: &[u8], split: usize) -> u16 {
        let descs: Vec<(u64, u32, bool)> = data
            .chunks(split)
            .map(|c| {
                let addr = self.tx.alloc(c.len() as u64);
                self.mem.write_slice(c, GuestAddress(addr)).unwrap();
                (addr, u32::try_from(c.len()).unwrap(), false)
            })
            .collect();
        let head = self.tx.add_chain(&descs);
        self.kick(TX_QUEUE);
        head
    }

    /// The guest posts an rx buffer of `len` bytes; returns its head and address.
    fn post_rx(&mut self, len: u32) -> (u16, u64) {
        let addr = self.rx.alloc(u64::from(len));
        (self.rx.add_chain(&[(addr, len, true)]), addr)
    }

    /// A frame the host side of the TAP receives, if any.
    fn host_recv(&mut self) -> Option<Vec<u8>> {
        let mut buf = vec![0; MAX_FRAME_LEN];
        match std::io::Read::read(&mut self.host, &mut buf) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("{e}"),
        }
    }

    /// The host sends `f` through the TAP and the device sees the TAP readable.
    fn host_send(&mut self, f: &[u8]) {
        assert_eq!(std::io::Write::write(&mut self.host, f).unwrap(), f.len());
        let fd = self.dev.tap.as_raw_fd();
        self.dev.handle_event(fd);
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// A good frame still goes both ways.
    fn assert_alive(&mut self) {
        let out = frame(60, 0x33, 0);
        let head = self.send(&out, 4096);
        assert_eq!(self.tx.used(), [(head, 0)]);
        assert_eq!(self.host_recv().unwrap(), out);
        let (head, addr) = self.post_rx(2048);
        let inbound = frame(90, 0x44, 0);
        self.host_send(&inbound);
        let len = inbound.len();
        assert_eq!(self.rx.used(), [(head, u32::try_from(len).unwrap())]);
        assert_eq!(self.read(addr + 12, len - 12), inbound[12..]);
    }
}

#[test]
fn offers_version_1_and_mac_and_shows_the_mac() {
    let (tap, _host) = fake_tap();
    let dev = Net::new(tap, MAC).unwrap();
    assert_eq!(dev.device_type(), VIRTIO_ID_NET);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    let f = dev.device_features();
    assert_eq!(f, (1 << 32) | (1 << 29) | (1 << consts::VIRTIO_NET_F_MAC));
    let mut cfg = [0xff; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(cfg, [2, 0, 0, 0, 0, 9, 0, 0]);
}

#[test]
fn tx_frames_reach_the_tap_with_offload_fields_cleared() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    // Header fields set by a driver that negotiated nothing must not reach the TAP.
    let out = frame(1500, 7, 0xee);
    let head = h.send(&out, 700);
    assert_eq!(h.tx.used(), [(head, 0)]);
    let got = h.host_recv().unwrap();
    assert_eq!(got[..10], [0; 10]);
    assert_eq!(got[10..], out[10..]);
    assert_eq!(h.dev.stats().tx_frames, 1);
    assert!(h.irq.status() & crate::virtio::INTERRUPT_VRING != 0);
}

#[test]
fn rx_frames_wait_for_a_buffer_and_get_num_buffers_1() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let inbound = [frame(1500, 1, 0), frame(42, 2, 0)];
    for f in &inbound {
        h.host_send(f);
    }
    assert!(h.rx.used().is_empty(), "no rx buffer yet");
    let bufs = [h.post_rx(1526), h.post_rx(1526)];
    h.kick(RX_QUEUE);
    let used = h.rx.used();
    assert_eq!(used.len(), 2);
    for (((head, addr), (uhead, ulen)), f) in bufs.iter().zip(&used).zip(&inbound) {
        assert_eq!((head, *ulen as usize), (uhead, f.len()));
        let got = h.read(*addr, f.len());
        assert_eq!(got[10..12], [1, 0], "num_buffers");
        assert_eq!(got[12..], f[12..]);
    }
    assert_eq!(h.dev.stats().rx_frames, 2);
}

#[test]
fn hostile_tx_chains_are_dropped_and_the_device_goes_on() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let buf = h.tx.alloc(4096);
    type Case = (&'static str, Vec<(u64, u32, u16, u16)>);
    let cases: Vec<Case> = vec![
        ("device-writable descriptor", vec![(buf, 100, F_WRITE, 0)]),
        ("shorter than the header", vec![(buf, 5, 0, 0)]),
        ("huge length", vec![(buf, u32::MAX, 0, 0)]),
        (
            "outside guest memory",
            vec![(MEM_SIZE as u64 - 8, 64, 0, 0)],
        ),
        (
            "longer than a frame",
            vec![(buf, 60_000, F_NEXT, 1), (buf, 60_000, 0, 0)],
        ),
        // The chain iterator stops after a queue's worth of descriptors: 1 MiB here.
        ("loop", vec![(buf, 4096, F_NEXT, 1), (buf, 4096, F_NEXT, 0)]),
    ];
    for (what, descs) in cases {
        let head = h.tx.add_raw(&descs);
        h.kick(TX_QUEUE);
        assert_eq!(h.tx.used(), [(head, 0)], "{what}");
        assert_eq!(h.host_recv(), None, "{what}: nothing reaches the TAP");
    }
    assert_eq!(h.dev.stats().dropped, 6);
    assert!(!h.irq.is_broken());
    h.assert_alive();
}

#[test]
fn hostile_rx_chains_drop_the_frame_and_the_device_goes_on() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let buf = h.rx.alloc(4096);
    type Case = (&'static str, usize, Vec<(u64, u32, u16, u16)>);
    let cases: Vec<Case> = vec![
        ("device-readable descriptor", 100, vec![(buf, 2048, 0, 0)]),
        ("too small", 100, vec![(buf, 20, F_WRITE, 0)]),
        (
            "outside guest memory",
            100,
            vec![(MEM_SIZE as u64 - 8, 2048, F_WRITE, 0)],
        ),
        // Bounded by the queue size: 256 descriptors of 8 bytes cannot hold 3000.
        (
            "loop",
            3000,
            vec![(buf, 8, F_WRITE | F_NEXT, 1), (buf, 8, F_WRITE | F_NEXT, 0)],
        ),
    ];
    for (what, len, descs) in cases {
        let head = h.rx.add_raw(&descs);
        h.host_send(&frame(len, 3, 0));
        assert_eq!(h.rx.used(), [(head, 0)], "{what}");
    }
    assert_eq!(h.dev.stats().dropped, 4);
    h.assert_alive();
}

#[test]
fn event_idx_asks_for_kicks_where_the_device_stopped() {
    let mem = test_mem();
    let mut h = Harness::with_event_idx(&mem, true);
    // avail_event sits after the used ring's entries.
    let avail_event = |used: GuestAddress| -> u16 {
        mem.read_obj(GuestAddress(used.0 + 4 + 8 * u64::from(QUEUE_SIZE)))
            .unwrap()
    };
    let rx_used = h.rx.mock.used_addr();
    h.post_rx(2048);
    for seed in 0..3 {
        h.host_send(&frame(100, seed, 0));
    }
    // One buffer for three frames: the device used it, then asked for a kick at the next.
    assert_eq!(h.rx.used().len(), 1);
    assert_eq!(avail_event(rx_used), 1);
    h.post_rx(2048);
    h.post_rx(2048);
    h.kick(RX_QUEUE);
    assert_eq!(
        h.rx.used().len(),
        2,
        "the waiting frame and the one still in the TAP"
    );
    // The TAP ran dry first: no kick needed until the buffers run out.
    assert_eq!(avail_event(rx_used), 1);
    h.host_send(&frame(100, 4, 0));
    assert_eq!(avail_event(rx_used), 3, "starved again after three buffers");
    h.post_rx(2048);
    h.kick(RX_QUEUE);
    assert_eq!(h.rx.used().len(), 1);
    // tx: after draining, the device asks for a kick at the next chain.
    h.send(&frame(60, 9, 0), 4096);
    h.send(&frame(60, 9, 0), 4096);
    assert_eq!(avail_event(h.tx.mock.used_addr()), 2);
    assert_eq!(h.dev.stats().tx_frames, 2);
}

#[test]
fn a_backend_at_end_of_file_does_not_spin() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.post_rx(2048);
    let (_, other_host) = fake_tap();
    drop(std::mem::replace(&mut h.host, other_host));
    // The device's end now reads 0 (end of file) for ever: the handler must return.
    let fd = h.dev.tap.as_raw_fd();
    h.dev.handle_event(fd);
    assert!(h.rx.used().is_empty());
}

#[test]
fn a_corrupt_avail_ring_marks_the_device_broken() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let idx_addr = GuestAddress(h.tx.mock.avail_addr().0 + 2);
    mem.write_obj(1000u16, idx_addr).unwrap();
    h.kick(TX_QUEUE);
    assert!(h.irq.is_broken());
    assert!(h.irq.status() & crate::virtio::INTERRUPT_CONFIG != 0);
    // A broken device leaves both rings alone until the driver resets it.
    h.host_send(&frame(10, 0, 0));
    h.post_rx(2048);
    h.kick(RX_QUEUE);
    assert!(h.rx.used().is_empty());
}

#[test]
fn a_full_tx_ring_is_taken_in_one_kick() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let n = usize::from(QUEUE_SIZE) - 1;
    for _ in 0..n {
        let addr = h.tx.alloc(64);
        h.tx.add_chain(&[(addr, 64, false)]);
    }
    h.kick(TX_QUEUE);
    assert_eq!(h.tx.used().len(), n);
    // The socket pair (unlike a TAP, which drops) may refuse a frame when its buffer is full.
    let s = h.dev.stats();
    assert_eq!(s.tx_frames + s.dropped, n as u64);
    assert!(s.tx_frames > 0);
}

#[test]
fn state_round_trips_and_the_restored_device_works_on_a_new_tap() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.assert_alive();
    let state = h.dev.save();
    assert_eq!(state.queues.len(), 2);
    assert_eq!(state.tap, "faketap0");
    let json = serde_json::to_string(&state).unwrap();
    let state: NetState = serde_json::from_str(&json).unwrap();

    let (tap, host) = fake_tap();
    let mac = MacAddr([2, 0, 0, 0, 0, 10]);
    let evts = [(); 2].map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let kicks = [0, 1].map(|i| evts[i].try_clone().unwrap());
    let args = NetRestoreArgs {
        tap,
        mac,
        queues: QueueRestoreArgs {
            mem: mem.clone(),
            queue_evts: evts.into(),
            interrupt: h.irq.clone(),
        },
    };
    let dev = Net::restore(args, &state).unwrap();
    assert!(dev.is_active());
    assert_eq!(dev.mac(), mac);
    // The same guest rings, continued by the restored device.
    h.dev = dev;
    h.host = host;
    h.kicks = kicks;
    h.assert_alive();

    let mut bad = state.clone();
    bad.version = 99;
    let no_queues = || NetRestoreArgs {
        tap: fake_tap().0,
        mac,
        queues: QueueRestoreArgs {
            mem: mem.clone(),
            queue_evts: vec![],
            interrupt: h.irq.clone(),
        },
    };
    assert!(matches!(
        Net::restore(no_queues(), &bad),
        Err(NetError::StateVersion { .. })
    ));
    bad = state;
    bad.queues.pop();
    assert!(Net::restore(no_queues(), &bad).is_err());
}
