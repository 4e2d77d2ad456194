//! Tests of the entropy device against virtio-queue's mock guest memory: the harness plays
//! the guest driver (it posts buffers and reads the used ring) and the event loop (a kick
//! writes the queue eventfd and calls the device's handler).

use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::device::CHAIN_BUDGET;
use super::*;
use crate::persist::Persist;
use crate::virtio::test_queue::{assert_drain_yields, GuestQueue, F_WRITE};
use crate::virtio::test_rig::Wired;
use crate::virtio::{
    feature, status, Activation, GuestMemory, QueueRestoreArgs, VirtioDevice, VirtioInterrupt,
    QUEUE_NOTIFY_OFFSET, VIRTIO_F_VERSION_1,
};

const MEM_SIZE: usize = 4 << 20;

fn test_mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

struct Harness<'m> {
    mem: &'m GuestMemory,
    dev: Rng,
    q: GuestQueue<'m>,
    kick: EventFd,
    irq: VirtioInterrupt,
}

impl<'m> Harness<'m> {
    fn new(mem: &'m GuestMemory) -> Self {
        let q = GuestQueue::new(mem, 0x0, 0x10_0000, 0x20_0000);
        let mut dev = Rng::new().unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = evt.try_clone().unwrap();
        let irq = VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        dev.ack_features(dev.device_features());
        dev.activate(Activation::new(
            mem.clone(),
            vec![q.queue()],
            vec![evt],
            irq.clone(),
        ))
        .unwrap();
        Self {
            mem,
            dev,
            q,
            kick,
            irq,
        }
    }

    fn run(&mut self) {
        self.kick.write(1).unwrap();
        let fd = self.dev.queue_fd().unwrap();
        self.dev.handle_event(fd);
    }

    /// A zeroed buffer of `len` bytes in guest memory.
    fn buffer(&mut self, len: u32) -> u64 {
        let addr = self.q.alloc(u64::from(len));
        let zeros = vec![0u8; usize::try_from(len).unwrap()];
        self.mem.write_slice(&zeros, GuestAddress(addr)).unwrap();
        addr
    }

    fn read(&self, addr: u64, len: u32) -> Vec<u8> {
        let mut b = vec![0u8; usize::try_from(len).unwrap()];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }
}

/// Whether `b` looks random: not all one byte value (a 64-byte random buffer is all one
/// value with probability 2^-504).
fn looks_random(b: &[u8]) -> bool {
    b.len() >= 16 && b.iter().any(|x| *x != b[0])
}

#[test]
fn requests_are_filled_with_random_bytes() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (a, b) = (h.buffer(64), h.buffer(64));
    let first = h.q.add_chain(&[(a, 64, true)]);
    let second = h.q.add_chain(&[(b, 64, true)]);
    h.run();
    assert_eq!(h.q.used(), vec![(first, 64), (second, 64)]);
    let (ra, rb) = (h.read(a, 64), h.read(b, 64));
    assert!(looks_random(&ra) && looks_random(&rb), "{ra:?} {rb:?}");
    assert_ne!(ra, rb, "two requests got the same bytes");
    assert_eq!(
        h.irq.irq_evt().read().unwrap(),
        1,
        "no used-buffer interrupt"
    );
}

#[test]
fn a_chain_of_several_buffers_is_filled_in_order_and_readable_ones_are_skipped() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let (ro, w1, w2) = (h.buffer(32), h.buffer(16), h.buffer(48));
    let head =
        h.q.add_chain(&[(ro, 32, false), (w1, 16, true), (w2, 48, true)]);
    h.run();
    assert_eq!(h.q.used(), vec![(head, 64)]);
    assert_eq!(
        h.read(ro, 32),
        vec![0u8; 32],
        "a device-readable buffer was written"
    );
    assert!(looks_random(&h.read(w1, 16)) && looks_random(&h.read(w2, 48)));
}

#[test]
fn a_huge_request_gets_at_most_max_request_len_bytes() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let len = u32::try_from(MAX_REQUEST_LEN).unwrap() * 4;
    let buf = h.buffer(len);
    let head = h.q.add_chain(&[(buf, len, true)]);
    h.run();
    assert_eq!(
        h.q.used(),
        vec![(head, u32::try_from(MAX_REQUEST_LEN).unwrap())]
    );
    let past = buf + u64::try_from(MAX_REQUEST_LEN).unwrap();
    assert_eq!(
        h.read(past, 4096),
        vec![0u8; 4096],
        "wrote past MAX_REQUEST_LEN"
    );
}

#[test]
fn hostile_chains_are_returned_empty_and_the_device_goes_on() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let end = u64::try_from(MEM_SIZE).unwrap();
    // Outside guest memory, straddling its end, readable only, and a looping chain.
    let outside = h.q.add_chain(&[(end + 0x1000, 64, true)]);
    let straddle = h.q.add_chain(&[(end - 16, 64, true)]);
    let ro = h.buffer(64);
    let readable = h.q.add_chain(&[(ro, 64, false)]);
    let lp = h.buffer(64);
    let looping =
        h.q.add_raw(&[(lp, 64, F_WRITE | 1, 1), (lp, 64, F_WRITE | 1, 0)]);
    h.run();
    let used = h.q.used();
    for head in [outside, straddle, readable] {
        assert!(
            used.contains(&(head, 0)),
            "{head} not returned empty: {used:?}"
        );
    }
    // The chain walk cuts a loop after a queue's worth of descriptors; filling the same
    // buffer that often is harmless, and MAX_REQUEST_LEN bounds it anyway.
    let max = u32::try_from(MAX_REQUEST_LEN).unwrap();
    assert!(
        used.iter().any(|(h, len)| *h == looping && *len <= max),
        "{used:?}"
    );
    assert!(!h.irq.is_broken());
    // A good request after all that is served.
    let good = h.buffer(32);
    let head = h.q.add_chain(&[(good, 32, true)]);
    h.run();
    assert_eq!(h.q.used(), vec![(head, 32)]);
    assert!(looks_random(&h.read(good, 32)));
}

#[test]
fn corrupt_avail_ring_marks_the_device_broken() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let idx_addr = GuestAddress(h.q.mock.avail_addr().0 + 2);
    mem.write_obj(1000u16, idx_addr).unwrap();
    h.run();
    assert!(h.q.used().is_empty());
    assert!(h.irq.is_broken(), "not marked DEVICE_NEEDS_RESET");
}

/// A ring whose used ring lies over its avail ring, so every used entry makes a new
/// available one: one call serves at most CHAIN_BUDGET requests, then re-kicks the queue.
#[test]
fn a_ring_that_refills_itself_does_not_hold_the_event_loop() {
    let mem = test_mem();
    let mut guest = GuestQueue::new(&mem, 0x0, 0x10_0000, 0x20_0000);
    let buf = guest.alloc(16);
    let head = guest.add_chain(&[(buf, 16, true)]);
    let queue = guest.self_refilling(head);
    let mut dev = Rng::new().unwrap();
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kicked = evt.try_clone().unwrap();
    let irq = VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    dev.activate(Activation::new(mem.clone(), vec![queue], vec![evt], irq))
        .unwrap();
    assert_drain_yields(CHAIN_BUDGET, &kicked, move || {
        dev.process_queue();
        dev.queues.active.map(|a| a.queues[0].next_avail())
    });
}

#[test]
fn a_restored_device_goes_on_where_the_saved_one_stopped() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let a = h.buffer(32);
    h.q.add_chain(&[(a, 32, true)]);
    h.run();
    assert_eq!(h.q.used().len(), 1);
    let state = h.dev.save();
    assert_eq!(state.queues.len(), 1);
    assert_eq!(state.acked_features, h.dev.device_features());
    // Back through serde, as a snapshot file carries it.
    let state: RngState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick = evt.try_clone().unwrap();
    let args = QueueRestoreArgs {
        mem: mem.clone(),
        queue_evts: vec![evt],
        interrupt: h.irq.clone(),
    };
    h.dev = Rng::restore(args, &state).unwrap();
    h.kick = kick;
    let b = h.buffer(32);
    let head = h.q.add_chain(&[(b, 32, true)]);
    h.run();
    assert_eq!(
        h.q.used(),
        vec![(head, 32)],
        "the restored queue lost its place"
    );
    assert!(looks_random(&h.read(b, 32)));
}

#[test]
fn a_foreign_or_impossible_state_is_refused() {
    let mem = test_mem();
    let h = Harness::new(&mem);
    let args = || QueueRestoreArgs {
        mem: mem.clone(),
        queue_evts: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
        interrupt: h.irq.clone(),
    };
    let good = h.dev.save();
    let old = RngState {
        version: RNG_STATE_VERSION + 1,
        ..good.clone()
    };
    assert!(matches!(
        Rng::restore(args(), &old),
        Err(RngError::StateVersion { .. })
    ));
    let two = RngState {
        queues: vec![good.queues[0]; 2],
        ..good.clone()
    };
    assert!(matches!(
        Rng::restore(args(), &two),
        Err(RngError::BadState(_))
    ));
    let mut outside = good.clone();
    outside.queues[0].desc_table = u64::try_from(MEM_SIZE).unwrap() + 0x1000;
    assert!(matches!(
        Rng::restore(args(), &outside),
        Err(RngError::BadState(_))
    ));
    // Saved before activation: restores inactive.
    let inactive = RngState {
        queues: Vec::new(),
        ..good
    };
    assert!(!Rng::restore(args(), &inactive).unwrap().is_active());
}

/// The whole stack as the VMM wires it: a driver negotiates through the MMIO registers and
/// event-manager runs the device.
#[test]
fn mmio_transport_and_event_manager_end_to_end() {
    let mem = test_mem();
    let dev = Arc::new(Mutex::new(Rng::new().unwrap()));
    let mut wired = Wired::new(&mem, &dev);
    let w = &mut wired;
    assert_eq!(w.r(0x08), VIRTIO_ID_RNG, "DeviceID");
    w.w(0x70, status::ACKNOWLEDGE | status::DRIVER);
    w.w(0x24, 1);
    w.w(0x20, 1); // VERSION_1
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    w.w(0x70, s);
    assert_eq!(w.r(0x70), s, "features accepted");
    let mut q = GuestQueue::new(&mem, 0x0, 0x10_0000, 0x10_0000);
    w.set_queue(0, &q);
    w.w(0x70, s | status::DRIVER_OK);
    assert_eq!(w.t.device_status(), s | status::DRIVER_OK);
    assert!(dev.lock().unwrap().is_active());
    assert_eq!(
        dev.lock().unwrap().acked_features,
        feature(VIRTIO_F_VERSION_1)
    );

    let buf = q.alloc(64);
    let head = q.add_chain(&[(buf, 64, true)]);
    w.w(QUEUE_NOTIFY_OFFSET, 0);
    let used = w.run_until_used(10, || q.used());
    assert_eq!(used, vec![(head, 64)]);
    let mut b = [0u8; 64];
    mem.read_slice(&mut b, GuestAddress(buf)).unwrap();
    assert!(looks_random(&b));
    // A reset unregisters the queue eventfd before it is closed; the loop keeps running.
    w.w(0x70, 0);
    w.run(1);
    assert!(!dev.lock().unwrap().is_active());
}
