//! The device around its data path: identity and config space, device resets, the
//! transport-reset event, state for snapshots, event-idx kicks, and the whole stack (MMIO
//! transport + device + event-manager) as the VMM wires it.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use super::*;
use crate::bus::BusDevice;
use crate::persist::Persist;
use crate::virtio::test_rig::Wired;
use crate::virtio::vsock::{VsockError, VsockRestoreArgs, VsockState, VSOCK_STATE_VERSION};
use crate::virtio::{status, QueueRestoreArgs, QUEUE_NOTIFY_OFFSET, VIRTIO_F_VERSION_1};

#[test]
fn transport_reset_event() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut client, _) = h.connect_from_host(1024, 4096);
    let buf = h.post_event_buf(8);
    assert!(h.dev.send_transport_reset().unwrap(), "delivered at once");
    let used = h.ev.used();
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, 4);
    let id: u32 = mem.read_obj(GuestAddress(buf)).unwrap();
    assert_eq!(id, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
    h.run();
    assert_eq!(
        read_available(&mut client),
        (vec![], true),
        "connections dropped"
    );
    assert!(h.dev.muxer.conns.is_empty());

    // Without an event buffer the event waits for one; a too-small one is skipped.
    assert!(!h.dev.send_transport_reset().unwrap());
    assert!(h.ev.used().is_empty());
    h.post_event_buf(2);
    let buf = h.post_event_buf(4);
    let used = h.ev.used();
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [0, 4]);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(buf)).unwrap(), 0);
    // Delivered once only.
    h.post_event_buf(4);
    assert!(h.ev.used().is_empty());
}

/// After a transport reset, a host client's request reaches the guest only once the guest
/// has handled the reset (re-posted the event buffer): a connection it accepted before
/// would be dropped by its reset handling without a word to the host.
#[test]
fn host_requests_wait_until_the_guest_has_handled_the_transport_reset() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.post_event_buf(8);
    h.post_rx(4, 4096);
    assert!(h.dev.send_transport_reset().unwrap());
    assert_eq!(h.ev.used().len(), 1);
    let mut client = UnixStream::connect(&h.path).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    h.run();
    assert!(
        h.rx_packets().is_empty(),
        "request sent before the guest handled the reset"
    );
    // The driver handles the event and re-posts its buffer.
    h.post_event_buf(8);
    let req = h.rx_packets();
    assert_eq!(req.len(), 1, "{req:?}");
    assert_eq!((req[0].op, req[0].dst_port), (op::REQUEST, 1024));
}

#[test]
fn transport_reset_needs_an_active_device() {
    let mem = test_mem();
    let mut h = Harness::inactive(&mem);
    assert!(matches!(
        h.dev.send_transport_reset(),
        Err(VsockError::NotActive)
    ));
}

#[test]
fn device_reset_drops_connections_and_queue_fds() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (mut client, _) = h.connect_from_host(1024, 4096);
    h.dev.reset();
    h.run();
    assert_eq!(read_available(&mut client), (vec![], true));
    assert!(!h.dev.is_active());
    assert_eq!(
        h.ep.fds.len(),
        2,
        "wake-up and listener only: {:?}",
        h.ep.fds
    );
    // A host client can still connect; its request waits for the next activation.
    let mut c = UnixStream::connect(&h.path).unwrap();
    c.write_all(b"CONNECT 5\n").unwrap();
    h.run();
    assert_eq!(h.dev.muxer.conns.len(), 1);
}

#[test]
fn config_space_and_identity() {
    let mem = test_mem();
    let h = Harness::inactive(&mem);
    let mut b = [0u8; 8];
    h.dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), GUEST_CID);
    let mut b = [0xffu8; 4];
    h.dev.read_config(4, &mut b);
    assert_eq!(b, [0; 4]);
    assert_eq!(h.dev.device_type(), 19);
    assert_eq!(h.dev.queue_max_sizes(), &[256, 256, 256]);
    assert_ne!(h.dev.device_features() & (1 << VIRTIO_F_VERSION_1), 0);
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            Vsock::new(cid, h.dir.0.join("x")),
            Err(VsockError::BadCid(_))
        ));
    }
    assert!(matches!(
        Vsock::new(5, &h.path),
        Err(VsockError::Bind { .. })
    ));
    // The socket file goes with the device.
    let path = h.dir.0.join("solo.sock");
    let solo = Vsock::new(7, &path).unwrap();
    assert!(path.exists());
    drop(solo);
    assert!(!path.exists());
}

#[test]
fn state_round_trip() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.dev.ack_features(1 << VIRTIO_F_VERSION_1);
    h.post_rx(3, 4096);
    let state = h.dev.save();
    assert_eq!(state.version, VSOCK_STATE_VERSION);
    assert_eq!(state.guest_cid, GUEST_CID);
    assert_eq!(state.acked_features, 1 << VIRTIO_F_VERSION_1);
    assert_eq!(state.queues.len(), 3);
    assert!(state.queues.iter().all(|q| q.ready && q.size == 256));
    let json = serde_json::to_string(&state).unwrap();
    let back: VsockState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);

    let restore = |state: &VsockState, sock: &str| {
        let args = VsockRestoreArgs {
            uds_path: h.dir.0.join(sock),
            queues: QueueRestoreArgs {
                mem: mem.clone(),
                queue_evts: (0..3).map(|_| EventFd::new(0).unwrap()).collect(),
                interrupt: h.irq.clone(),
            },
        };
        Vsock::restore(args, state)
    };
    let restored = restore(&back, "restored.sock").unwrap();
    assert!(restored.is_active());
    assert_eq!(restored.save(), state);

    let mut old = state.clone();
    old.version = 99;
    let err = restore(&old, "a");
    assert!(matches!(
        err,
        Err(VsockError::StateVersion { found: 99, .. })
    ));
    let mut bad = state.clone();
    bad.queues[1].used_ring = MEM_SIZE as u64;
    let err = restore(&bad, "b");
    assert!(matches!(err, Err(VsockError::BadState(_))));
    let mut bad = state;
    bad.queues[0].size = 3;
    let err = restore(&bad, "c");
    assert!(matches!(err, Err(VsockError::BadState(_))));
}

/// A restored device hands its host clients ports the snapshotted one had not used yet:
/// the guest may still hold sockets of the connections made before the snapshot, and
/// answers a request on one of their ports with a reset.
#[test]
fn restored_device_does_not_reuse_host_ports_of_the_snapshot() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (_a, first) = h.connect_from_host(1024, 4096);
    let (_b, second) = h.connect_from_host(1024, 4096);
    assert_eq!(h.dev.save().next_host_port, second + 1);
    h.restore_in_place("restored.sock");
    assert!(h.dev.muxer.conns.is_empty());
    let (_c, after) = h.connect_from_host(1024, 4096);
    assert!(
        after > second,
        "ports before the snapshot {first} and {second}, after it {after}"
    );

    // A state whose port lies below the host range starts the range again.
    h.dev.muxer.continue_local_ports_at(7);
    let (_d, restarted) = h.connect_from_host(1024, 4096);
    assert_eq!(restarted, first);
}

/// The whole stack as the VMM wires it: the driver brings the device up through the MMIO
/// registers, a host client connects, and event-manager runs the device.
#[test]
fn mmio_transport_and_event_manager_end_to_end() {
    let mem = test_mem();
    let dir = TestDir::new("vsock");
    let path = dir.0.join("v.sock");
    let mut rx = GuestQueue::new(&mem, 0x0, 0x10_0000, 0x10_0000);
    let tx = GuestQueue::new(&mem, 0x1_0000, 0x20_0000, 0x1000);
    let ev = GuestQueue::new(&mem, 0x2_0000, 0x30_0000, 0x1000);
    let dev = Arc::new(Mutex::new(Vsock::new(GUEST_CID, &path).unwrap()));
    let mut wired = Wired::new(&mem, &dev);
    let w = &mut wired;
    w.w(0x70, status::ACKNOWLEDGE);
    w.w(0x70, status::ACKNOWLEDGE | status::DRIVER);
    w.w(0x24, 1);
    w.w(0x20, 1); // VERSION_1
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    w.w(0x70, s);
    for (i, q) in (0u32..).zip([&rx, &tx, &ev]) {
        w.set_queue(i, q);
    }
    w.w(0x70, s | status::DRIVER_OK);
    assert_eq!(w.t.device_status(), s | status::DRIVER_OK);
    let mut cid = [0u8; 8];
    w.t.read(0x100, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);

    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    let a = rx.alloc(4140);
    rx.add_chain(&[(a, 4140, true)]);
    w.w(QUEUE_NOTIFY_OFFSET, 0); // for rx, no ioeventfd in between
    let used = w.run_until_used(100, || rx.used());
    assert_eq!(used.len(), 1, "the REQUEST arrived");
    assert_eq!(used[0].1, 44);
    let op_field: u16 = mem.read_obj(GuestAddress(a + 30)).unwrap();
    assert_eq!(op_field, op::REQUEST);
    assert_eq!(w.r(0x60) & 1, 1, "used-buffer interrupt pending");

    // A driver reset takes the queue fds out of the event loop again.
    w.w(0x70, 0);
    w.run(10);
    assert!(!dev.lock().unwrap().is_active());
}

#[test]
fn event_idx_asks_for_kicks_when_starved() {
    let mem = test_mem();
    let mut h = Harness::activated(&mem, true);
    let (mut client, local) = h.connect_from_host(1024, 1 << 20);
    // avail_event sits after the used ring's entries.
    let avail_event = |h: &Harness<'_>, used: GuestAddress| -> u16 {
        h.mem
            .read_obj(used.unchecked_add(4 + 8 * u64::from(QSIZE)))
            .unwrap()
    };
    let rx_used = h.rx.mock.used_addr();
    // The REQUEST used the only rx buffer; the device then ran dry and asked to be
    // kicked at the next one (index 1).
    client.write_all(&[5u8; 10_000]).unwrap();
    h.run();
    assert_eq!(avail_event(&h, rx_used), 1);
    h.post_rx(2, 4096);
    let got = rw_bytes(&h.rx_packets());
    assert_eq!(got.len(), 8192);
    assert_eq!(
        avail_event(&h, rx_used),
        3,
        "starved again after two buffers"
    );
    h.post_rx(2, 4096);
    assert_eq!(rw_bytes(&h.rx_packets()).len(), 10_000 - 8192);
    // tx: after draining, the device asks for a kick at the next chain.
    h.send(Hdr::new(op::RW, 1024, local), b"ok");
    let tx_used = h.tx.mock.used_addr();
    assert_eq!(avail_event(&h, tx_used), 2, "RESPONSE and RW consumed");
    assert_eq!(read_available(&mut client).0, b"ok");
}
