//! Virtqueue descriptor-chain walking as the vsock and net devices do it, on a guest-controlled
//! ring: guest memory (64 KiB, optionally a second region past a hole) holds a
//! fuzzer-written descriptor table, avail ring and buffers (loops, out-of-range addresses,
//! huge lengths, indirect descriptors, wrapping indices). Then:
//!
//! - the tx path pops every chain (`packet_io::drain_tx`: `VsockPacket::from_tx_virtq_chain`,
//!   else the gather of a split payload) and reads each packet that parses;
//! - the same ring, as an rx queue, is filled (`packet_io::fill_rx`:
//!   `VsockPacket::from_rx_virtq_chain`) with packets of fuzzer-chosen lengths;
//! - a net device is activated with the same ring as its tx and rx queues: it sends every tx
//!   chain it accepts to a stand-in TAP, then receives frames of fuzzer-chosen lengths;
//! - an entropy device is activated with the same ring and fills every chain it can.
//!
//! Work per input is bounded: at most 256 chains per pass, each chain bounded by the queue
//! size (or by the indirect table, itself inside 80 KiB of memory).

#![no_main]

use arbitrary::Arbitrary;
use kiln_devices::virtio::vsock::fuzzing::{drain_tx, fill_rx};
use kiln_devices::virtio::GuestMemory;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const MAIN: u64 = 0x1_0000;
const SECOND: u64 = 0x2_0000;
const SECOND_LEN: u64 = 0x4000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

#[derive(Arbitrary, Debug)]
enum Addr {
    /// An offset into the main region (the common case).
    Main(u16),
    /// An offset into the region past the hole.
    Second(u16),
    /// Anything: in the hole, past the end, near u64::MAX.
    Raw(u64),
}

impl Addr {
    fn get(&self) -> u64 {
        match *self {
            Addr::Main(o) => u64::from(o),
            Addr::Second(o) => SECOND + u64::from(o),
            Addr::Raw(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Len {
    Small(u8),
    Header,
    Any(u32),
}

impl Len {
    fn get(&self) -> u32 {
        match *self {
            Len::Small(n) => u32::from(n),
            Len::Header => 44,
            Len::Any(n) => n,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Desc {
    /// Placed at this index of the table (modulo the queue size).
    index: u8,
    addr: Addr,
    len: Len,
    /// Bits 0..=2: NEXT, WRITE, INDIRECT; the rest as given.
    flags: u16,
    next: u16,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Queue size 2^(size_log2 % 9), 1..=256.
    size_log2: u8,
    event_idx: bool,
    next_avail: u16,
    next_used: u16,
    avail_idx: u16,
    avail_ring: Vec<u16>,
    used_event: u16,
    descs: Vec<Desc>,
    /// Bytes written into guest memory (packet headers, indirect tables, payload).
    blobs: Vec<(Addr, Vec<u8>)>,
    /// The ring's addresses: the fixed layout, or fuzzer-chosen ones.
    rings: Option<(Addr, Addr, Addr)>,
    /// Payload lengths of the rx packets the device tries to send.
    rx_payloads: Vec<u16>,
    /// Lengths of the frames the net device's TAP delivers.
    net_frames: Vec<u16>,
}

fn queue(input: &Input, size: u16, desc: u64, avail: u64, used: u64) -> Queue {
    let mut q = Queue::new(256).expect("queue");
    q.set_size(size);
    let split = |a: u64| (Some((a & 0xffff_ffff) as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(desc);
    q.set_desc_table_address(lo, hi);
    let (lo, hi) = split(avail);
    q.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(used);
    q.set_used_ring_address(lo, hi);
    q.set_event_idx(input.event_idx);
    q.set_next_avail(input.next_avail);
    q.set_next_used(input.next_used);
    q.set_ready(true);
    q
}

fuzz_target!(|input: Input| {
    let mem = GuestMemory::from_ranges(&[
        (GuestAddress(0), MAIN as usize),
        (GuestAddress(SECOND), SECOND_LEN as usize),
    ])
    .expect("guest memory");
    let size = 1u16 << (input.size_log2 % 9);
    let (desc, avail, used) = match &input.rings {
        None => (DESC, AVAIL, USED),
        Some((d, a, u)) => (d.get(), a.get(), u.get()),
    };
    // Buffers first, so the rings written after them win where they overlap.
    for (at, bytes) in input.blobs.iter().take(64) {
        let _ = mem.write_slice(&bytes[..bytes.len().min(4096)], GuestAddress(at.get()));
    }
    for d in input.descs.iter().take(512) {
        let at = desc.wrapping_add(16 * u64::from(u16::from(d.index) % size));
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&d.addr.get().to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.get().to_le_bytes());
        raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
        raw[14..].copy_from_slice(&d.next.to_le_bytes());
        let _ = mem.write_slice(&raw, GuestAddress(at));
    }
    for (i, head) in input.avail_ring.iter().take(256).enumerate() {
        let _ = mem.write_obj(*head, GuestAddress(avail.wrapping_add(4 + 2 * i as u64)));
    }
    let _ = mem.write_obj(input.avail_idx, GuestAddress(avail.wrapping_add(2)));
    let used_event = avail.wrapping_add(4 + 2 * u64::from(size));
    let _ = mem.write_obj(input.used_event, GuestAddress(used_event));

    let mut tx = queue(&input, size, desc, avail, used);
    let mut packets = 0usize;
    drain_tx(&mut tx, &mem, |pkt| {
        packets += 1;
        // What the muxer reads of a packet: every header field and the payload.
        let data_len = pkt.data_slice().map_or(0, |d| d.len());
        if pkt.len() > 0 {
            assert_eq!(data_len, pkt.len() as usize, "payload slice != header len");
        }
        let _ = (pkt.src_cid(), pkt.dst_cid(), pkt.src_port(), pkt.dst_port());
        let _ = (
            pkt.type_(),
            pkt.op(),
            pkt.flags(),
            pkt.buf_alloc(),
            pkt.fwd_cnt(),
        );
        if let Some(d) = pkt.data_slice() {
            let mut buf = vec![0u8; d.len()];
            d.copy_to(&mut buf);
        }
    });
    assert!(
        packets <= 2 * 256,
        "more packets than two passes of the ring"
    );

    let payloads: Vec<u32> = input
        .rx_payloads
        .iter()
        .take(512)
        .map(|&n| u32::from(n))
        .collect();
    let mut rx = queue(&input, size, desc, avail, used);
    fill_rx(&mut rx, &mem, &payloads);

    let frames: Vec<Vec<u8>> = input
        .net_frames
        .iter()
        .take(64)
        .map(|&n| vec![0x5a; usize::from(n)])
        .collect();
    kiln_devices::virtio::net::fuzzing::run(
        &mem,
        queue(&input, size, desc, avail, used),
        queue(&input, size, desc, avail, used),
        &frames,
    );
    kiln_devices::virtio::rng::fuzzing::run(&mem, queue(&input, size, desc, avail, used));
});
