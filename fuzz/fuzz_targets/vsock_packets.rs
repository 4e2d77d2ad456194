//! The vsock device's packet path end to end: an activated `Vsock` (its queues in guest
//! memory, a fake epoll set, host sockets for real) fed a sequence of fuzzer-built tx
//! packets (REQUEST/RESPONSE/RW/SHUTDOWN/RST/CREDIT_* or any op, arbitrary ports, lengths,
//! flags, buf_alloc, fwd_cnt), rx buffers, queue kicks, host clients and a transport reset.
//!
//! The device must never panic, never keep an fd ready without making progress, and keep
//! its epoll bookkeeping straight (the harness asserts both). At most 64 steps per input.

#![no_main]

use arbitrary::Arbitrary;
use kiln_devices::virtio::vsock::fuzzing::{Harness, GUEST_CID, LISTEN_PORT};
use kiln_devices::virtio::vsock::HOST_CID;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    Request,
    Response,
    Rst,
    Shutdown,
    Rw,
    CreditUpdate,
    CreditRequest,
    Other(u16),
}

impl Op {
    fn code(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
            Op::Other(n) => n,
        }
    }
}

/// A port: mostly a few well-known ones so packets meet existing connections.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Port {
    /// The host port a listener waits on.
    Listen,
    /// One of a handful of guest-ish ports, 1024..1032.
    Small(u8),
    /// One of the first ports the device gives host-initiated connections (2^30 + n): the
    /// guest's RESPONSE to a host client's CONNECT goes there.
    HostSide(u8),
    Any(u32),
}

impl Port {
    fn get(self) -> u32 {
        match self {
            Port::Listen => LISTEN_PORT,
            Port::Small(n) => 1024 + u32::from(n % 8),
            Port::HostSide(n) => (1 << 30) + u32::from(n % 8),
            Port::Any(p) => p,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Packet {
    op: Op,
    src_port: Port,
    dst_port: Port,
    /// Wrong CIDs and socket types now and then.
    odd_cids: Option<(u64, u64)>,
    type_: Option<u16>,
    /// `None`: the payload's length; else a lie.
    len: Option<u32>,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    payload_len: u16,
    fill: u8,
    /// 0: header and payload in one descriptor, else the payload in pieces of this size.
    piece: u16,
}

impl Packet {
    fn header(&self, payload_len: u32) -> [u8; 44] {
        let (src_cid, dst_cid) = self.odd_cids.unwrap_or((GUEST_CID, HOST_CID));
        let mut b = [0u8; 44];
        b[0..8].copy_from_slice(&src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.get().to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.get().to_le_bytes());
        b[24..28].copy_from_slice(&self.len.unwrap_or(payload_len).to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.unwrap_or(1).to_le_bytes());
        b[30..32].copy_from_slice(&self.op.code().to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// Queue tx packets, then kick the tx queue.
    Send(Vec<Packet>),
    /// Post rx buffers (n, payload room) and kick the rx queue.
    PostRx(u8, u16),
    PostEvent(u8),
    /// A host client connects and sends `CONNECT <port>\n` (or garbage).
    HostConnect(Option<Port>),
    HostWrite(u8, u16),
    HostClose(u8),
    TransportReset,
}

#[derive(Arbitrary, Debug)]
struct Input {
    event_idx: bool,
    steps: Vec<Step>,
}

fuzz_target!(|input: Input| {
    let mut h = Harness::new(input.event_idx);
    for step in input.steps.iter().take(64) {
        match step {
            Step::Send(packets) => {
                for p in packets.iter().take(32) {
                    let n = usize::from(p.payload_len) % (70 * 1024);
                    let payload = vec![p.fill; n];
                    let header = p.header(n as u32);
                    h.queue_tx(&header, &payload, usize::from(p.piece));
                }
                h.kick(1);
            }
            Step::PostRx(n, room) => {
                h.post_rx(usize::from(*n % 32), u32::from(*room));
                h.kick(0);
            }
            Step::PostEvent(len) => {
                h.post_event(u32::from(*len % 16));
                h.kick(2);
            }
            Step::HostConnect(port) => {
                let line = match port {
                    Some(p) => format!("CONNECT {}\n", p.get()).into_bytes(),
                    None => b"CONNEC 1\r\n\0".to_vec(),
                };
                h.host_connect(&line);
            }
            Step::HostWrite(i, len) => {
                let data = vec![0x5a; usize::from(*len)];
                h.host_write(usize::from(*i), &data);
            }
            Step::HostClose(i) => h.host_close(usize::from(*i)),
            Step::TransportReset => h.transport_reset(),
        }
    }
});
