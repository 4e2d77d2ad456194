//! Hostile input: malformed chains in either queue, rx buffers with no room for a payload,
//! bad connect lines from host clients, and a ring that keeps refilling itself.

use std::io::Write;
use std::os::unix::net::UnixStream;

use super::*;

#[test]
fn malformed_tx_chains_are_dropped() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.post_rx(2, 4096);
    let hdr_with_len = |h: &mut Harness<'_>, len: u32| {
        let mut hdr = Hdr::new(op::RW, 5000, 52);
        hdr.len = Some(len);
        let a = h.tx.alloc(44);
        h.mem.write_slice(&hdr.encode(0), GuestAddress(a)).unwrap();
        a
    };
    let outside = MEM_SIZE as u64 + 0x1000;

    let a = h.tx.alloc(44);
    h.send_raw(&[(a, 20, false)]); // header descriptor too short
    h.send_raw(&[(a, 44, true)]); // header descriptor device-writable
    let a = hdr_with_len(&mut h, 100);
    h.send_raw(&[(a, 44, false)]); // payload announced, no payload descriptor
    let d = h.tx.alloc(100);
    h.send_raw(&[(a, 44, false), (d, 50, false)]); // payload descriptor too short
    h.send_raw(&[(a, 44, false), (d, 100, true)]); // payload descriptor device-writable
    h.send_raw(&[(a, 44, false), (outside, 100, false)]); // payload outside guest memory
    let big = hdr_with_len(&mut h, 1 << 20);
    h.send_raw(&[(big, 44, false), (d, 1 << 20, false)]); // payload over 64 KiB
    h.send_raw(&[(outside, 44, false)]); // header outside guest memory
    h.send_raw(&[(MEM_SIZE as u64 - 8, 44, false)]); // header across the end of memory
    h.send_raw(&[(u64::MAX - 8, 44, false)]); // header address wraps
    let used = h.tx.used();
    assert_eq!(used.len(), 10);
    assert!(used.iter().all(|u| u.1 == 0), "{used:?}");
    assert!(
        h.rx_packets().is_empty(),
        "nothing reached the connection logic"
    );

    // The device still works: an unknown connection gets its reset.
    h.send(Hdr::new(op::RW, 5000, 52), b"x");
    let pkts = h.rx_packets();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].op, op::RST);
}

#[test]
fn malformed_rx_chains_are_skipped() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let a = h.rx.alloc(4096);
    h.rx.add_chain(&[(a, 4096, false)]); // read-only
    h.rx.add_chain(&[(a, 20, true)]); // too short for a header
    h.rx.add_chain(&[(a, 44, true), (a + 64, 100, false)]); // read-only payload part
    h.rx.add_chain(&[(MEM_SIZE as u64 + 4096, 4096, true)]); // outside guest memory
    h.post_rx(1, 4096);
    h.send(Hdr::new(op::RW, 5000, 52), b"x");
    let pkts = h.rx_packets();
    assert_eq!(
        pkts.iter().map(|p| p.used_len).collect::<Vec<_>>(),
        [0, 0, 0, 0, 44]
    );
    assert_eq!(pkts[4].op, op::RST);
}

#[test]
fn rx_buffers_without_payload_room() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut client, local) = h.connect_from_host(1024, 4096);
    // A credit update waits for a buffer.
    h.send(Hdr::new(op::CREDIT_REQUEST, 1024, local), &[]);
    // Header-only buffers (a second, empty payload descriptor).
    let header_only = |h: &mut Harness<'_>| {
        let a = h.rx.alloc(64);
        h.rx.add_chain(&[(a, 44, true), (a + 48, 0, true)]);
        h.kick(RXQ);
    };
    header_only(&mut h);
    let pkts = h.rx_packets();
    assert_eq!(pkts.len(), 1);
    assert_eq!((pkts[0].op, pkts[0].used_len), (op::CREDIT_UPDATE, 44));
    // Data cannot go into one: it is handed back unused instead of blocking the ring.
    client.write_all(b"data").unwrap();
    header_only(&mut h);
    h.post_rx(1, 4096);
    let pkts = h.rx_packets();
    assert_eq!(pkts.iter().map(|p| p.used_len).collect::<Vec<_>>(), [0, 48]);
    assert_eq!(rw_bytes(&pkts), b"data");
}

#[test]
fn bad_connect_lines_close_the_client() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.post_rx(4, 4096);
    let mut bad = UnixStream::connect(&h.path).unwrap();
    bad.set_nonblocking(true).unwrap();
    bad.write_all(b"HELLO 1024\n").unwrap();
    let mut long = UnixStream::connect(&h.path).unwrap();
    long.set_nonblocking(true).unwrap();
    long.write_all(&[b'9'; 200]).unwrap();
    let quitter = UnixStream::connect(&h.path).unwrap();
    drop(quitter);
    h.run();
    assert_eq!(read_available(&mut bad), (vec![], true));
    assert_eq!(read_available(&mut long), (vec![], true));
    assert!(h.rx_packets().is_empty(), "the guest heard nothing");
    assert!(h.dev.muxer.conns.is_empty());
    assert_eq!(
        h.ep.fds.len(),
        5,
        "only the device's own fds are left: {:?}",
        h.ep.fds
    );
}

/// Found by fuzz target `virtq_chain` (a timeout): a tx ring whose used ring lies over its
/// avail ring, with `next_used` ahead of `next_avail`, makes every used entry a new
/// available chain, and `drain_tx` used to pop them forever, holding the event loop.
#[test]
fn a_ring_that_refills_itself_does_not_hold_the_event_loop() {
    use crate::virtio::vsock::packet_io::{drain_tx, CHAIN_BUDGET};
    use virtio_queue::Queue;

    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x2_0000)]).unwrap();
    let mut desc = [0u8; 16];
    desc[..8].copy_from_slice(&0x1_0000u64.to_le_bytes());
    desc[8..12].copy_from_slice(&44u32.to_le_bytes());
    mem.write_slice(&desc, GuestAddress(0)).unwrap();
    mem.write_obj(5u16, GuestAddress(0x1002)).unwrap(); // avail idx: 5 chains, all head 0
    let mut q = Queue::new(16).unwrap();
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x1000), Some(0));
    q.set_used_ring_address(Some(0x1000), Some(0)); // over the avail ring
    q.set_next_used(5);
    q.set_ready(true);
    let kicked = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let evt = kicked.try_clone().unwrap();
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let irq = VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut packets = 0;
        drain_tx(&mut q, &mem, &evt, &irq, |_| packets += 1);
        let _ = done.send(packets);
    });
    let packets = result
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("drain_tx still popping a self-refilling ring after 20 s");
    assert_eq!(packets, CHAIN_BUDGET);
    assert_eq!(
        kicked.read().unwrap(),
        1,
        "stopping on the budget must kick the queue to come back"
    );
}
