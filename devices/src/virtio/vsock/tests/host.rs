//! Host-initiated connections: the CONNECT handshake, data both ways, credit, closing.

use std::io::Write;
use std::os::unix::net::UnixStream;

use event_manager::EventSet;

use super::*;
use crate::virtio::vsock::{CONN_BUF_ALLOC, SHUTDOWN_RCV, SHUTDOWN_SEND};

#[test]
fn connect_handshake() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let mut client = UnixStream::connect(&h.path).unwrap();
    client.set_nonblocking(true).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    h.run();
    // No rx buffer yet: the REQUEST waits.
    assert!(h.rx_packets().is_empty());
    h.post_rx(2, 4096);
    let pkts = h.rx_packets();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    let req = &pkts[0];
    assert_eq!(req.op, op::REQUEST);
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(req.dst_port, 1024);
    assert!(req.src_port >= 1 << 30);
    assert_eq!(req.type_, 1);
    assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
    assert_eq!(req.used_len, 44);
    assert_eq!(
        read_available(&mut client),
        (vec![], false),
        "no OK before RESPONSE"
    );

    h.send(Hdr::new(op::RESPONSE, 1024, req.src_port), &[]);
    let (line, eof) = read_available(&mut client);
    assert!(!eof);
    assert_eq!(line, format!("OK {}\n", req.src_port).into_bytes());
    assert_ne!(h.irq.status(), 0, "the guest was interrupted");
}

#[test]
fn data_both_ways() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut client, local) = h.connect_from_host(1024, 64 * 1024);

    client.write_all(b"hello guest").unwrap();
    h.post_rx(4, 4096);
    let pkts = h.rx_packets();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].op, op::RW);
    assert_eq!((pkts[0].src_port, pkts[0].dst_port), (local, 1024));
    assert_eq!(pkts[0].data, b"hello guest");
    assert_eq!(pkts[0].used_len, 44 + 11);

    h.send(Hdr::new(op::RW, 1024, local), b"hello host");
    assert_eq!(read_available(&mut client), (b"hello host".to_vec(), false));

    // Our fwd_cnt reports what reached the host.
    client.write_all(b"!").unwrap();
    h.run();
    let pkts = h.rx_packets();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].fwd_cnt, 10);
    assert_eq!(pkts[0].data, b"!");
}

#[test]
fn payload_sent_right_after_connect_line_is_kept() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let mut client = UnixStream::connect(&h.path).unwrap();
    client.set_nonblocking(true).unwrap();
    client.write_all(b"CONNECT 7\nearly bytes").unwrap();
    h.post_rx(4, 4096);
    let req = h.rx_packets();
    assert_eq!(req.len(), 1);
    h.send(Hdr::new(op::RESPONSE, 7, req[0].src_port), &[]);
    let pkts = h.rx_packets();
    assert_eq!(rw_bytes(&pkts), b"early bytes");
}

#[test]
fn credit_exhaustion_and_recovery() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    // The guest has room for 100 bytes only.
    let (mut client, local) = h.connect_from_host(1024, 100);
    let sent: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
    client.write_all(&sent).unwrap();
    h.post_rx(8, 4096);
    let pkts = h.rx_packets();
    let got = rw_bytes(&pkts);
    assert_eq!(got, &sent[..100], "exactly the guest's credit");
    assert!(
        pkts.iter().any(|p| p.op == op::CREDIT_REQUEST),
        "asks for credit when it runs out: {pkts:?}"
    );
    // Not reading the host socket while there is no credit.
    let fd = conn_fd(&h, local, 1024);
    assert!(!h.ep.fds[&fd].contains(EventSet::IN));
    h.run();
    assert!(h.rx_packets().is_empty(), "nothing more without credit");

    // The guest read 100 bytes: credit for 100 more.
    let mut upd = Hdr::new(op::CREDIT_UPDATE, 1024, local);
    upd.buf_alloc = 100;
    upd.fwd_cnt = 100;
    h.send(upd, &[]);
    let got2 = rw_bytes(&h.rx_packets());
    assert_eq!(got2, &sent[100..200]);

    // A bigger buffer: the rest flows.
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 200;
    h.send(upd, &[]);
    let got3 = rw_bytes(&h.rx_packets());
    assert_eq!(got3, &sent[200..]);
    assert!(h.ep.fds[&fd].contains(EventSet::IN), "reading again");
}

#[test]
fn credit_request_from_guest_is_answered() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (_client, local) = h.connect_from_host(1024, 4096);
    h.post_rx(2, 4096);
    h.send(Hdr::new(op::CREDIT_REQUEST, 1024, local), &[]);
    let pkts = h.rx_packets();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].op, op::CREDIT_UPDATE);
    assert_eq!(pkts[0].buf_alloc, CONN_BUF_ALLOC);
}

#[test]
fn guest_refusal_closes_the_client() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let mut client = UnixStream::connect(&h.path).unwrap();
    client.set_nonblocking(true).unwrap();
    client.write_all(b"CONNECT 99\n").unwrap();
    h.post_rx(1, 4096);
    let req = h.rx_packets();
    assert_eq!(req[0].op, op::REQUEST);
    h.send(Hdr::new(op::RST, 99, req[0].src_port), &[]);
    assert_eq!(
        read_available(&mut client),
        (vec![], true),
        "closed without OK"
    );
    assert!(h.dev.muxer.conns.is_empty());
}

#[test]
fn guest_rst_closes_the_host_socket() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut client, local) = h.connect_from_host(1024, 4096);
    h.send(Hdr::new(op::RST, 1024, local), &[]);
    assert_eq!(read_available(&mut client), (vec![], true));
    h.post_rx(1, 4096);
    assert!(
        h.rx_packets().is_empty(),
        "no reset is sent back for a reset"
    );
}

#[test]
fn host_close_is_passed_on_after_the_data() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut client, local) = h.connect_from_host(1024, 4096);
    client.write_all(b"last words").unwrap();
    drop(client);
    h.post_rx(4, 4096);
    let pkts = h.rx_packets();
    let ops: Vec<u16> = pkts.iter().map(|p| p.op).collect();
    assert_eq!(ops, [op::RW, op::SHUTDOWN], "{pkts:?}");
    assert_eq!(pkts[0].data, b"last words");
    assert_eq!(pkts[1].flags, SHUTDOWN_SEND | SHUTDOWN_RCV);
    // The guest closes its end too: the device finishes with a reset and forgets it.
    let mut shut = Hdr::new(op::SHUTDOWN, 1024, local);
    shut.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    h.send(shut, &[]);
    let pkts = h.rx_packets();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].op, op::RST);
    assert!(h.dev.muxer.conns.is_empty());
}

#[test]
fn guest_close_gives_the_client_eof_after_the_data() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut client, local) = h.connect_from_host(1024, 4096);
    h.queue_tx(Hdr::new(op::RW, 1024, local), b"bye");
    let mut shut = Hdr::new(op::SHUTDOWN, 1024, local);
    shut.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    h.send(shut, &[]);
    assert_eq!(read_available(&mut client), (b"bye".to_vec(), true));
    h.post_rx(1, 4096);
    let pkts = h.rx_packets();
    assert_eq!(pkts.len(), 1);
    assert_eq!((pkts[0].op, pkts[0].src_port), (op::RST, local));
}

#[test]
fn half_close_from_the_host_keeps_the_other_direction() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut client, local) = h.connect_from_host(1024, 4096);
    client.write_all(b"request").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    h.post_rx(4, 4096);
    let pkts = h.rx_packets();
    let ops: Vec<u16> = pkts.iter().map(|p| p.op).collect();
    assert_eq!(ops, [op::RW, op::SHUTDOWN]);
    assert_eq!(pkts[1].flags, SHUTDOWN_SEND);
    // The guest still answers.
    h.send(Hdr::new(op::RW, 1024, local), b"response");
    assert_eq!(read_available(&mut client), (b"response".to_vec(), false));
}

#[test]
fn many_connections_are_kept_apart() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let mut clients = Vec::new();
    for i in 0..20u32 {
        let (c, local) = h.connect_from_host(2000 + i, 4096);
        clients.push((c, local, 2000 + i));
    }
    let locals: std::collections::HashSet<u32> = clients.iter().map(|c| c.1).collect();
    assert_eq!(locals.len(), 20);
    for (c, _, port) in &mut clients {
        c.write_all(format!("to {port}").as_bytes()).unwrap();
    }
    h.post_rx(40, 4096);
    let pkts = h.rx_packets();
    assert_eq!(pkts.len(), 20);
    for p in &pkts {
        assert_eq!(p.data, format!("to {}", p.dst_port).into_bytes());
    }
    for (_, local, port) in &clients {
        h.queue_tx(
            Hdr::new(op::RW, *port, *local),
            format!("from {port}").as_bytes(),
        );
    }
    h.kick(TXQ);
    for (c, _, port) in &mut clients {
        assert_eq!(read_available(c).0, format!("from {port}").into_bytes());
    }
}

/// A host client that connects and never sends its `CONNECT` line is dropped once the
/// handshake timeout has passed, by the device's own tick (the event loop is never
/// blocked waiting for it), and a client that sends its line in time is not.
#[test]
fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.dev.muxer.handshake_timeout = std::time::Duration::ZERO;
    let mut silent = UnixStream::connect(&h.path).unwrap();
    silent.set_nonblocking(true).unwrap();
    h.run();
    assert_eq!(h.dev.muxer.pending_len(), 1, "accepted, in its handshake");
    assert!(
        h.ep.fds.len() > 5,
        "the tick is registered while a client is pending"
    );
    // Wait for the tick (1 s period) the way the event loop would: poll on the device's
    // fds, with a bound.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.dev.muxer.pending_len() > 0 {
        assert!(std::time::Instant::now() < deadline, "never dropped");
        let mut fds: Vec<libc::pollfd> =
            h.ep.fds
                .keys()
                .map(|fd| libc::pollfd {
                    fd: *fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
        let nfds = libc::nfds_t::try_from(fds.len()).unwrap();
        // SAFETY: `fds` is a valid array of `nfds` pollfd structs for the whole call.
        unsafe { libc::poll(fds.as_mut_ptr(), nfds, 2000) };
        h.run();
    }
    assert_eq!(read_available(&mut silent), (vec![], true), "EOF");
    assert_eq!(h.ep.fds.len(), 5, "the tick left the epoll set with it");

    // With the default timeout, a prompt client gets through.
    h.dev.muxer.handshake_timeout = std::time::Duration::from_secs(5);
    let mut prompt = UnixStream::connect(&h.path).unwrap();
    prompt.write_all(b"CONNECT 1024\n").unwrap();
    h.run();
    h.post_rx(1, 4096);
    assert_eq!(h.rx_packets()[0].op, op::REQUEST);
}
