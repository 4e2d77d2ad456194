//! Guest-initiated connections to `P_N`, and flow control of guest → host data.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

use super::*;
use crate::virtio::vsock::unix::host_port_path;
use crate::virtio::vsock::{CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// The guest connects from its port 5000 to host port `port`, where `listener` listens.
fn guest_connect(h: &mut Harness<'_>, listener: &UnixListener, port: u32) -> UnixStream {
    h.post_rx(2, 4096);
    h.send(Hdr::new(op::REQUEST, 5000, port), &[]);
    let pkts = h.rx_packets();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].op, op::RESPONSE);
    assert_eq!((pkts[0].src_port, pkts[0].dst_port), (port, 5000));
    assert_eq!((pkts[0].src_cid, pkts[0].dst_cid), (HOST_CID, GUEST_CID));
    let (peer, _) = listener.accept().unwrap();
    peer.set_nonblocking(true).unwrap();
    peer
}

#[test]
fn connect_to_a_listening_host_port() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let listener = UnixListener::bind(host_port_path(&h.path, 52)).unwrap();
    let mut peer = guest_connect(&mut h, &listener, 52);

    h.send(Hdr::new(op::RW, 5000, 52), b"ready");
    assert_eq!(read_available(&mut peer), (b"ready".to_vec(), false));

    peer.write_all(b"job").unwrap();
    h.run();
    let pkts = h.rx_packets();
    assert_eq!(pkts.len(), 1);
    assert_eq!((pkts[0].op, pkts[0].dst_port), (op::RW, 5000));
    assert_eq!(pkts[0].data, b"job");
    assert_eq!(pkts[0].fwd_cnt, 5);

    // The guest closes: the host sees EOF and the guest gets its final reset.
    let mut shut = Hdr::new(op::SHUTDOWN, 5000, 52);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.send(shut, &[]);
    assert_eq!(read_available(&mut peer), (vec![], true));
    h.post_rx(1, 4096);
    let pkts = h.rx_packets();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].op, op::RST);
}

#[test]
fn connect_without_a_listener_is_reset() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.post_rx(2, 4096);
    h.send(Hdr::new(op::REQUEST, 5000, 53), &[]);
    let pkts = h.rx_packets();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].op, op::RST);
    assert_eq!((pkts[0].src_port, pkts[0].dst_port), (53, 5000));
    assert_eq!((pkts[0].src_cid, pkts[0].dst_cid), (HOST_CID, GUEST_CID));
    assert!(h.dev.muxer.conns.is_empty());
}

#[test]
fn connect_to_a_closed_listener_is_reset() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    // The socket file exists but nothing listens any more.
    let path = host_port_path(&h.path, 54);
    drop(UnixListener::bind(&path).unwrap());
    h.post_rx(1, 4096);
    h.send(Hdr::new(op::REQUEST, 5000, 54), &[]);
    assert_eq!(h.rx_packets()[0].op, op::RST);
}

#[test]
fn slow_host_reader_gets_everything_and_the_guest_gets_credit() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let listener = UnixListener::bind(host_port_path(&h.path, 60)).unwrap();
    let mut peer = guest_connect(&mut h, &listener, 60);
    h.post_rx(16, 4096);

    // The guest sends its whole credit in 64 KiB packets while the host reads nothing.
    let chunk: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
    let chunks = CONN_BUF_ALLOC as usize / chunk.len();
    for _ in 0..chunks {
        h.send(Hdr::new(op::RW, 5000, 60), &chunk);
    }
    // The host socket's own buffer took part; the rest waits in the device.
    let mut got = Vec::new();
    let mut updates = Vec::new();
    for _ in 0..1000 {
        let mut buf = [0u8; 65536];
        match peer.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        h.run(); // writable again: the device flushes.
        updates.extend(h.rx_packets());
        if got.len() == chunks * chunk.len() {
            break;
        }
    }
    assert_eq!(got.len(), chunks * chunk.len());
    assert!(got.chunks(chunk.len()).all(|c| c == chunk.as_slice()));
    // The guest was told about the freed space in time: it never believes it has less
    // than the update threshold left.
    let last = updates.last().expect("a credit update");
    assert_eq!(last.op, op::CREDIT_UPDATE);
    assert!(updates.iter().all(|p| p.op == op::CREDIT_UPDATE));
    let unacked = got.len() - last.fwd_cnt as usize;
    assert!(CONN_BUF_ALLOC as usize - unacked >= CREDIT_UPDATE_THRESHOLD as usize);
}

#[test]
fn guest_sending_past_its_credit_is_reset() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let listener = UnixListener::bind(host_port_path(&h.path, 61)).unwrap();
    let mut peer = guest_connect(&mut h, &listener, 61);
    h.post_rx(4, 4096);
    let chunk = vec![7u8; 65536];
    let mut reset_after = None;
    // The host never reads: the socket buffer fills, then the device's buffer, then the
    // guest has overrun the credit it was given.
    for i in 0..64 {
        h.send(Hdr::new(op::RW, 5000, 61), &chunk);
        let pkts = h.rx_packets();
        if pkts.iter().any(|p| p.op == op::RST) {
            reset_after = Some(i);
            break;
        }
    }
    let i = reset_after.expect("the device resets an overrunning guest");
    assert!(
        i >= 4,
        "not before the advertised {CONN_BUF_ALLOC} bytes ({i} chunks)"
    );
    assert!(h.dev.muxer.conns.is_empty());
    // The host socket is closed; it got a prefix of the data.
    let (data, eof) = read_available(&mut peer);
    assert!(eof);
    assert!(data.iter().all(|b| *b == 7));
}

#[test]
fn data_on_an_unknown_connection_is_reset() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.post_rx(2, 4096);
    h.send(Hdr::new(op::RW, 5000, 70), b"who?");
    let pkts = h.rx_packets();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].op, op::RST);
    assert_eq!((pkts[0].src_port, pkts[0].dst_port), (70, 5000));
}

#[test]
fn non_stream_and_foreign_packets() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.post_rx(4, 4096);
    // SEQPACKET is not offered: reset.
    let mut seq = Hdr::new(op::REQUEST, 5000, 52);
    seq.type_ = 2;
    h.send(seq, &[]);
    // Another CID as destination: reset, from that CID.
    let mut other = Hdr::new(op::REQUEST, 5001, 52);
    other.dst_cid = 9;
    h.send(other, &[]);
    // A spoofed source CID: dropped silently.
    let mut spoof = Hdr::new(op::REQUEST, 5002, 52);
    spoof.src_cid = 77;
    h.send(spoof, &[]);
    let pkts = h.rx_packets();
    assert_eq!(pkts.len(), 2, "{pkts:?}");
    assert!(pkts.iter().all(|p| p.op == op::RST));
    assert_eq!((pkts[0].src_cid, pkts[0].dst_port), (HOST_CID, 5000));
    assert_eq!((pkts[1].src_cid, pkts[1].dst_port), (9, 5001));
}

#[test]
fn protocol_violations_reset_only_that_connection() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let listener = UnixListener::bind(host_port_path(&h.path, 80)).unwrap();
    let mut a = guest_connect(&mut h, &listener, 80);
    h.post_rx(4, 4096);
    h.send(Hdr::new(op::REQUEST, 6000, 80), &[]);
    let (mut b, _) = listener.accept().unwrap();
    b.set_nonblocking(true).unwrap();
    assert_eq!(h.rx_packets()[0].op, op::RESPONSE);

    // A RESPONSE on an established connection, and an unknown op.
    h.send(Hdr::new(op::RESPONSE, 5000, 80), &[]);
    h.send(Hdr::new(42, 6000, 80), &[]);
    let pkts = h.rx_packets();
    assert_eq!(pkts.len(), 2);
    assert!(pkts.iter().all(|p| p.op == op::RST));
    assert_eq!(read_available(&mut a), (vec![], true));
    assert_eq!(read_available(&mut b), (vec![], true));
    assert!(h.dev.muxer.conns.is_empty());
    // A duplicate REQUEST resets the existing connection too.
    let mut c = guest_connect(&mut h, &listener, 80);
    h.send(Hdr::new(op::REQUEST, 5000, 80), &[]);
    assert_eq!(read_available(&mut c), (vec![], true));
}

/// Linux 6.12 sends payloads over ~32 KiB as a header descriptor plus one descriptor per
/// skb fragment; a payload may also follow the header in the head descriptor and go on in
/// the next one. Every shape reaches the host whole and in order.
#[test]
fn payloads_split_over_several_descriptors_arrive_whole() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let listener = UnixListener::bind(host_port_path(&h.path, 56)).unwrap();
    let mut peer = guest_connect(&mut h, &listener, 56);
    let payload: Vec<u8> = (0..60_000u32)
        .map(|i| (i * 7 + i / 251).to_le_bytes()[0])
        .collect();
    let len = u32::try_from(payload.len()).unwrap();
    let write = |h: &mut Harness<'_>, bytes: &[u8]| {
        let a = h.tx.alloc(bytes.len() as u64);
        h.mem.write_slice(bytes, GuestAddress(a)).unwrap();
        a
    };

    // Header alone, then the payload in three fragments of uneven sizes.
    let hdr = write(&mut h, &Hdr::new(op::RW, 5000, 56).encode(len));
    let (f1, rest) = payload.split_at(32_768);
    let (f2, f3) = rest.split_at(20_000);
    let d1 = write(&mut h, f1);
    let d2 = write(&mut h, f2);
    let d3 = write(&mut h, f3);
    h.send_raw(&[
        (hdr, 44, false),
        (d1, 32_768, false),
        (d2, 20_000, false),
        (d3, u32::try_from(f3.len()).unwrap(), false),
    ]);
    // Header and the first bytes in one descriptor, the rest in a second one.
    let mut head = Hdr::new(op::RW, 5000, 56).encode(len).to_vec();
    head.extend_from_slice(&payload[..1000]);
    let a = write(&mut h, &head);
    let b = write(&mut h, &payload[1000..]);
    h.send_raw(&[(a, 1044, false), (b, len - 1000, false)]);

    let mut got = Vec::new();
    while got.len() < 2 * payload.len() {
        h.run();
        let (bytes, eof) = read_available(&mut peer);
        assert!(!eof && !bytes.is_empty(), "got {} bytes so far", got.len());
        got.extend_from_slice(&bytes);
    }
    assert!(got[..payload.len()] == payload[..], "split payload");
    assert!(
        got[payload.len()..] == payload[..],
        "payload after the header"
    );
    assert!(h.tx.used().iter().all(|u| u.1 == 0));
}
