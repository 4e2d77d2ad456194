//! A hostile driver of the virtio-vsock device: tx chains that loop, point outside guest
//! memory, claim huge lengths or bogus indirect tables are dropped (and logged) and the
//! device keeps answering; an avail index far past the ring marks only vsock
//! DEVICE_NEEDS_RESET, and a reset brings it back.

use crate::block;
use crate::guest::{self, Code, Driver, Rings, F_INDIRECT, F_NEXT, F_WRITE, VSOCK};

/// rx, tx, event.
pub const RINGS: [Rings; 3] = [
    Rings { base: 0x10_0000 },
    Rings { base: 0x10_1000 },
    Rings { base: 0x10_2000 },
];
const TX_HDR: u32 = 0x13_0000;
const TX_DATA: u32 = 0x13_1000;
const RX_BUF: u32 = 0x13_2000;
const NOWHERE: u64 = 0xdead_0000_0000;
/// The packet header's size and its `op` field's offset (virtio 1.2, 5.10.6).
const HDR_LEN: u32 = 44;
const OP_OFFSET: u32 = 30;
const OP_REQUEST: u16 = 1;
const OP_RW: u16 = 5;
/// The op the device answers a request for a host port nobody listens on with.
pub const RST: u8 = 3;

/// Writes a tx packet header from the guest (CID 3, port 1234) to host port 9999, where
/// nothing listens.
fn header(c: &mut Code, op: u16, len: u32) {
    let words = [
        3,
        0,
        2,
        0,
        1234,
        9999,
        len,
        1 | (u32::from(op) << 16),
        0,
        4096,
        0,
    ];
    for (i, w) in (0u32..).zip(words) {
        c.poke32(TX_HDR + 4 * i, w);
    }
}

/// Offers the tx chain `descs` (descriptors 0.., head 0) as tx chain number `n` and waits
/// until the device returns it (or breaks).
fn send(c: &mut Code, n: u16, descs: &[(u64, u32, u16)]) {
    let tx = RINGS[1];
    c.window(VSOCK);
    for (i, &(addr, len, flags)) in (0u16..).zip(descs) {
        c.desc(tx.desc(), i, addr, len, flags, i + 1);
    }
    c.offer(tx, 1, n, 0).wait_used(tx.used_idx(), n + 1);
}

/// A connection request to a host port nobody listens on, as tx chain `n` with one rx
/// buffer offered as rx chain 0: prints the op of the device's answer ([`RST`]).
pub fn probe(c: &mut Code, n: u16) {
    probe_after(c, n, 0);
}

/// [`probe`], its rx buffer offered as rx chain `rx_n` (after `rx_n` others).
fn probe_after(c: &mut Code, n: u16, rx_n: u16) {
    let rx = RINGS[0];
    c.window(VSOCK)
        .poke32(RX_BUF + OP_OFFSET, 0)
        .desc(rx.desc(), 0, u64::from(RX_BUF), 64, F_WRITE, 0)
        .offer(rx, 0, rx_n, 0);
    header(c, OP_REQUEST, 0);
    send(c, n, &[(u64::from(TX_HDR), HDR_LEN, 0)]);
    c.wait_used(rx.used_idx(), rx_n + 1)
        .print_mem(RX_BUF + OP_OFFSET);
}

/// Brings vsock up (prints 0x0f).
pub fn bring_up(c: &mut Code) {
    c.window(VSOCK).bring_up(&RINGS);
}

/// vsock's [`bring_up`] and [`probe`].
pub const DRIVER: Driver = Driver { bring_up, probe };

#[test]
fn hostile_vsock_chains_are_dropped_and_a_corrupt_ring_breaks_only_vsock() {
    let tx = RINGS[1];
    let mut c = Code::new(VSOCK);
    bring_up(&mut c);
    // A loop: header -> payload -> header -> … for a 16-byte payload.
    header(&mut c, OP_RW, 16);
    c.desc(tx.desc(), 1, u64::from(TX_DATA), 16, F_NEXT, 0);
    c.offer(tx, 1, 0, 0).wait_used(tx.used_idx(), 1);
    // The header outside guest memory; a header length of ~4 GiB and a payload length the
    // device refuses; indirect tables (not negotiated) outside memory and 8 bytes long.
    send(&mut c, 1, &[(NOWHERE, HDR_LEN, 0)]);
    header(&mut c, OP_RW, 0xffff_f000);
    send(&mut c, 2, &[(u64::from(TX_HDR), 0xffff_ffff, 0)]);
    send(&mut c, 3, &[(NOWHERE, 64, F_INDIRECT)]);
    send(&mut c, 4, &[(u64::from(TX_DATA), 8, F_INDIRECT)]);
    c.print_status();
    // rx buffers outside guest memory and device-readable: dropped, and the answer to the
    // next request lands in the good buffer offered after them.
    let rx = RINGS[0];
    c.desc(rx.desc(), 1, NOWHERE, 64, F_WRITE, 0)
        .desc(rx.desc(), 2, u64::from(RX_BUF), 64, 0, 0)
        .offer(rx, 0, 0, 1)
        .offer(rx, 0, 1, 2);
    probe_after(&mut c, 5, 2);
    // The tx avail index jumps past its ring.
    c.corrupt_avail(tx, 1);
    // The disk and the serial port still work; a reset brings vsock back.
    let out = guest::recover_and_run(c, "vsock", block::DRIVER, DRIVER);

    let want = [
        0x0f,
        0x0f, // still live after the malformed chains
        RST,
        0x4f, // DEVICE_NEEDS_RESET
        0x0f,
        0,
        guest::DISK_BYTE,
        0x0f,
        RST,
        b'K',
    ];
    assert_eq!(out.console, want, "log:\n{}", out.log);
    for line in [
        "vsock: dropping malformed tx chain",
        "vsock: dropping malformed rx chain",
        "the device needs a reset: vsock tx queue",
    ] {
        assert!(
            out.log.contains(line),
            "no {line:?} in the log:\n{}",
            out.log
        );
    }
}
