//! A hostile driver of the virtio-rng device: buffers outside guest memory, readable
//! buffers, a buffer far larger than a request may be, and a looping chain each come back
//! with what the device could fill (0, 0, 64 KiB, a bounded amount), and the device keeps
//! serving; an avail index far past the ring marks only the entropy device
//! DEVICE_NEEDS_RESET, and a reset brings it back.

use crate::guest::{self, Code, Driver, Rings, F_NEXT, F_WRITE, QUEUE_SIZE, RNG};
use crate::vsock;

const RINGS: Rings = Rings { base: 0x13_0000 };
/// A small request's buffer, and a 16 MiB one for the oversized request.
const BUF: u32 = 0x14_0000;
const BIG: u32 = 0x20_0000;
const BIG_LEN: u32 = 16 << 20;
/// Far outside the guest's 64 MiB.
const NOWHERE: u64 = 0xdead_0000_0000;

/// Offers the chain `descs` (descriptors 0.. of the table, head 0) as request number `n`
/// and waits until the device returns it (or breaks); then prints byte `byte` of the used
/// length.
fn request(c: &mut Code, n: u16, descs: &[(u64, u32, u16)], byte: u32) {
    c.window(RNG);
    for (i, &(addr, len, flags)) in (0u16..).zip(descs) {
        c.desc(RINGS.desc(), i, addr, len, flags, i + 1);
    }
    let used_len = RINGS.used() + 4 + 8 * (u32::from(n) % QUEUE_SIZE) + 4;
    c.poke32(used_len, 0xffff_ffff)
        .offer(RINGS, 0, n, 0)
        .wait_used(RINGS.used_idx(), n + 1)
        .print_mem(used_len + byte);
}

/// A good 16-byte request as number `n`: prints 0x10.
fn probe(c: &mut Code, n: u16) {
    request(c, n, &[(u64::from(BUF), 16, F_WRITE)], 0);
}

fn bring_up(c: &mut Code) {
    c.window(RNG).bring_up(&[RINGS]);
}

const DRIVER: Driver = Driver { bring_up, probe };

#[test]
fn hostile_rng_requests_come_back_bounded_and_a_corrupt_ring_breaks_only_the_rng() {
    let mut c = Code::new(RNG);
    bring_up(&mut c);
    probe(&mut c, 0);
    // Outside guest memory; readable only; 16 MiB (prints byte 2 of 64 KiB: 0x01).
    request(&mut c, 1, &[(NOWHERE, 16, F_WRITE)], 0);
    request(&mut c, 2, &[(u64::from(BUF), 16, 0)], 0);
    request(&mut c, 3, &[(u64::from(BIG), BIG_LEN, F_WRITE)], 2);
    // A loop: descriptor 0 says next is 0. The chain walk cuts it; prints 'L' once back.
    c.desc(RINGS.desc(), 0, u64::from(BUF), 16, F_NEXT | F_WRITE, 0)
        .offer(RINGS, 0, 4, 0)
        .wait_used(RINGS.used_idx(), 5)
        .print(b'L');
    probe(&mut c, 5);
    c.corrupt_avail(RINGS, 0);
    // The vsock device and the serial port still work; a reset brings the rng back.
    let out = guest::recover_and_run(c, "rng", vsock::DRIVER, DRIVER);

    let want = [
        0x0f,
        0x10, // live, a 16-byte request filled
        0x00,
        0x00,
        0x01,
        b'L', // outside memory, readable, 64 KiB of 16 MiB, the loop
        0x10, // still serving
        0x4f, // DEVICE_NEEDS_RESET
        0x0f,
        vsock::RST, // vsock unharmed
        0x0f,
        0x10, // the rng back after a reset
        b'K',
    ];
    assert_eq!(out.console, want, "log:\n{}", out.log);
    for line in [
        "virtio-rng: unusable request",
        "the device needs a reset: virtio-rng request queue",
    ] {
        assert!(
            out.log.contains(line),
            "no {line:?} in the log:\n{}",
            out.log
        );
    }
}
