//! A hostile driver of the virtio-blk device: chains that loop, point outside guest memory,
//! claim huge lengths or bogus indirect tables each get an error status (or come back
//! unused when there is nowhere to write one), and the disk keeps serving; an avail index
//! far past the ring marks only the disk DEVICE_NEEDS_RESET, and a reset brings it back.

use crate::guest::{self, Code, Driver, Rings, BLOCK, DISK_BYTE, F_INDIRECT, F_NEXT, F_WRITE};
use crate::vsock;

pub const RINGS: Rings = Rings { base: 0x11_0000 };
/// A request's header, data buffer and status byte.
const HDR: u32 = 0x12_0000;
const DATA: u32 = 0x12_1000;
const STATUS: u32 = 0x12_2000;
/// Far outside the guest's 64 MiB.
const NOWHERE: u64 = 0xdead_0000_0000;
const VIRTIO_BLK_S_IOERR: u8 = 1;

/// Offers the chain `descs` (descriptors 0.. of the table, head 0) as request number `n`,
/// with a read of `sector` in the header, and waits until the disk returns it (or breaks);
/// then prints the status byte (0xff: never written).
fn request(c: &mut Code, n: u16, sector: u64, descs: &[(u64, u32, u16)]) {
    c.window(BLOCK);
    #[allow(clippy::cast_possible_truncation)] // the two halves of sector
    c.poke32(HDR, 0) // VIRTIO_BLK_T_IN
        .poke32(HDR + 4, 0)
        .poke32(HDR + 8, sector as u32)
        .poke32(HDR + 12, (sector >> 32) as u32);
    c.poke32(STATUS, 0xff).poke32(DATA, 0);
    for (i, &(addr, len, flags)) in (0u16..).zip(descs) {
        c.desc(RINGS.desc(), i, addr, len, flags, i + 1);
    }
    c.offer(RINGS, 0, n, 0)
        .wait_used(RINGS.used_idx(), n + 1)
        .print_mem(STATUS);
}

/// A good read of sector 0 as request number `n`: prints [`DISK_BYTE`], then status 0.
pub fn probe(c: &mut Code, n: u16) {
    let good = [
        (u64::from(HDR), 16, F_NEXT),
        (u64::from(DATA), 512, F_NEXT | F_WRITE),
        (u64::from(STATUS), 1, F_WRITE),
    ];
    request(c, n, 0, &good);
    c.print_mem(DATA);
}

/// Brings the disk up (prints 0x0f).
pub fn bring_up(c: &mut Code) {
    c.window(BLOCK).bring_up(&[RINGS]);
}

/// The disk's [`bring_up`] and [`probe`].
pub const DRIVER: Driver = Driver { bring_up, probe };

#[test]
fn hostile_block_requests_fail_and_a_corrupt_ring_breaks_only_the_disk() {
    let hdr = (u64::from(HDR), 16, F_NEXT);
    let status = (u64::from(STATUS), 1, F_WRITE);
    let mut c = Code::new(BLOCK);
    bring_up(&mut c);
    probe(&mut c, 0);
    // A loop: header -> data -> header -> … (descriptor 1 says next is 0).
    c.desc(RINGS.desc(), 1, u64::from(DATA), 512, F_NEXT | F_WRITE, 0)
        .poke32(STATUS, 0xff)
        .offer(RINGS, 0, 1, 0)
        .wait_used(RINGS.used_idx(), 2)
        .print_mem(STATUS);
    // Data outside guest memory; a data length of ~4 GiB; a sector past the disk.
    request(
        &mut c,
        2,
        0,
        &[hdr, (NOWHERE, 512, F_NEXT | F_WRITE), status],
    );
    request(
        &mut c,
        3,
        0,
        &[
            hdr,
            (u64::from(DATA), 0xffff_fe00, F_NEXT | F_WRITE),
            status,
        ],
    );
    request(
        &mut c,
        4,
        u64::MAX / 512,
        &[hdr, (u64::from(DATA), 512, F_NEXT | F_WRITE), status],
    );
    // Indirect tables (not negotiated): outside memory, and one 8 bytes long.
    request(&mut c, 5, 0, &[(NOWHERE, 48, F_INDIRECT)]);
    request(&mut c, 6, 0, &[(u64::from(DATA), 8, F_INDIRECT)]);
    probe(&mut c, 7);
    c.corrupt_avail(RINGS, 0);
    // The vsock device and the serial port still work; a reset brings the disk back.
    let out = guest::recover_and_run(c, "block", vsock::DRIVER, DRIVER);

    let ok = [0, DISK_BYTE];
    let mut want = vec![0x0f];
    want.extend(ok);
    want.push(0xff); // the loop: returned unused, no status
    want.extend([VIRTIO_BLK_S_IOERR; 3]);
    want.extend([0xff, 0xff]); // the indirect tables: no status descriptor found
    want.extend(ok);
    want.push(0x4f); // DEVICE_NEEDS_RESET
    want.extend([0x0f, vsock::RST, 0x0f]);
    want.extend(ok);
    want.push(b'K');
    assert_eq!(out.console, want, "log:\n{}", out.log);
    for line in [
        "chain returned unused",
        "request failed",
        "the device needs a reset: virtio-blk request queue",
    ] {
        assert!(
            out.log.contains(line),
            "no {line:?} in the log:\n{}",
            out.log
        );
    }
}
