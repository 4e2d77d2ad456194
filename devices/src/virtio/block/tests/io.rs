//! Requests that should work: reads, writes, flush, GET_ID, discard, read-only disks, the
//! config space, and the device under a real event-manager loop.

use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use event_manager::SubscriberOps;

use super::*;
use crate::virtio::block::{RawFile, VIRTIO_ID_BLOCK};
use crate::virtio::test_rig::{run_until_used, Manager};
use crate::virtio::{feature, Activation, INTERRUPT_VRING, VIRTIO_F_VERSION_1};

const MIB: usize = 1 << 20;

fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}

#[test]
fn read_write_round_trip_over_several_descriptors() {
    let dir = TestDir::new("blk");
    let path = image(&dir.path("disk.img"), MIB, 1);
    let mem = test_mem();
    let mut h = Harness::new(&mem, RawFile::open(&path, false).unwrap());

    let data = pattern(6144, 77);
    let (a, b, c) = (&data[..512], &data[512..4608], &data[4608..]);
    assert_eq!(h.write(100, &[a, b, c]), (OK, 1));
    assert_eq!(
        file_bytes(&path, 100 * 512, 6144),
        data,
        "landed at sector 100"
    );
    assert_eq!(
        file_bytes(&path, 99 * 512, 512),
        pattern(MIB, 1)[99 * 512..100 * 512],
        "the sector before is untouched"
    );
    assert_eq!(
        file_bytes(&path, 112 * 512, 512),
        pattern(MIB, 1)[112 * 512..113 * 512],
        "the sector after is untouched"
    );

    // Read back split differently; used length counts the data and the status byte.
    let (status, used, got) = h.read(100, &[1024, 5120]);
    assert_eq!((status, used), (OK, 6145));
    assert_eq!(got, data);
    assert_eq!(h.read_ok(0, 8), pattern(MIB, 1)[..4096]);
    // The last sector is in range.
    let last = (MIB / 512 - 1) as u64;
    h.write_ok(last, &[9u8; 512]);
    assert_eq!(h.read_ok(last, 1), [9u8; 512]);
    assert_ne!(
        h.irq.status() & INTERRUPT_VRING,
        0,
        "the guest was interrupted"
    );

    // A request larger than the bounce buffer goes through in pieces.
    let big = pattern(300 * 1024, 5);
    h.write_ok(1, &big);
    assert_eq!(h.read_ok(1, 600), big);
    assert_eq!(file_bytes(&path, 512, big.len()), big);
}

#[test]
fn flush_get_id_and_unsupported_types() {
    let dir = TestDir::new("blk");
    let path = image(&dir.path("disk.img"), 64 * 1024, 1);
    let mem = test_mem();
    let mut h = Harness::new(&mem, RawFile::open(&path, false).unwrap());

    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));

    let id = h.q.alloc(20);
    assert_eq!(
        h.request(VIRTIO_BLK_T_GET_ID, 0, &[(id, 20, true)]),
        (OK, 21)
    );
    let mut got = [0u8; 20];
    mem.read_slice(&mut got, GuestAddress(id)).unwrap();
    let mut want = [0u8; 20];
    want[..SERIAL.len()].copy_from_slice(SERIAL);
    assert_eq!(got, want);
    // A short buffer gets what fits.
    let short = h.q.alloc(8);
    mem.write_slice(&[0u8; 8], GuestAddress(short)).unwrap();
    assert_eq!(
        h.request(VIRTIO_BLK_T_GET_ID, 0, &[(short, 8, true)]),
        (OK, 9)
    );
    let mut got = [0u8; 8];
    mem.read_slice(&mut got, GuestAddress(short)).unwrap();
    assert_eq!(got, SERIAL[..8]);

    // SCSI, WRITE_ZEROES, SECURE_ERASE, a zone op and nonsense.
    for ty in [2, 13, 14, 16, 0x1234_5678] {
        assert_eq!(h.request(ty, 0, &[]), (UNSUPP, 1), "type {ty}");
    }
    // The device still serves requests.
    assert_eq!(h.read_ok(0, 1), pattern(64 * 1024, 1)[..512]);
}

#[test]
fn default_serial_names_the_file() {
    let dir = TestDir::new("blk");
    let a = image(&dir.path("a.img"), 512, 1);
    let b = image(&dir.path("b.img"), 512, 1);
    let (sa, sb) = (Block::default_serial(&a), Block::default_serial(&b));
    assert_ne!(sa, sb);
    assert_eq!(sa, Block::default_serial(&a));
    assert!(!sa.is_empty() && sa.len() <= 20);
}

#[test]
fn discard_on_a_raw_file_reads_back_zeros() {
    let dir = TestDir::new("blk");
    let path = image(&dir.path("disk.img"), MIB, 3);
    let orig = pattern(MIB, 3);
    let mem = test_mem();
    let mut h = Harness::new(&mem, RawFile::open(&path, false).unwrap());

    // One aligned 64 KiB range (punched), one odd sector (punched or zero-filled).
    assert_eq!(h.discard(&[(128, 128, 0), (3, 1, 0)]), (OK, 1));
    let file = std::fs::read(&path).unwrap();
    assert_eq!(file.len(), MIB, "discard keeps the size");
    assert!(file[128 * 512..256 * 512].iter().all(|&b| b == 0));
    assert!(file[3 * 512..4 * 512].iter().all(|&b| b == 0));
    assert_eq!(file[..3 * 512], orig[..3 * 512]);
    assert_eq!(file[4 * 512..128 * 512], orig[4 * 512..128 * 512]);
    assert_eq!(file[256 * 512..], orig[256 * 512..]);
    assert_eq!(h.read_ok(128, 2), vec![0u8; 1024]);

    // A bad segment fails the whole request before any segment is applied.
    let cap = (MIB / 512) as u64;
    assert_eq!(h.discard(&[(0, 1, 0), (cap, 1, 0)]).0, IOERR);
    assert_eq!(h.discard(&[(0, 1, 0), (cap - 1, 2, 0)]).0, IOERR);
    assert_eq!(h.discard(&[(0, 1, 0), (u64::MAX, 1, 0)]).0, IOERR);
    // The unmap flag (WRITE_ZEROES only) and unknown flags are unsupported.
    assert_eq!(h.discard(&[(0, 1, 0), (5, 1, 1)]).0, UNSUPP);
    assert_eq!(h.discard(&[(0, 1, 0x80)]).0, UNSUPP);
    // Too many segments, none at all.
    assert_eq!(h.discard(&[(0, 1, 0); 33]).0, IOERR);
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, &[]).0, IOERR);
    assert_eq!(h.read_ok(0, 1), orig[..512], "sector 0 never discarded");
}

#[test]
fn read_only_disk_refuses_writes() {
    let dir = TestDir::new("blk");
    let path = image(&dir.path("ro.img"), 64 * 1024, 4);
    let before = std::fs::read(&path).unwrap();
    let mem = test_mem();
    let mut h = Harness::new(&mem, RawFile::open(&path, true).unwrap());
    let f = h.dev.device_features();
    assert_ne!(f & feature(VIRTIO_BLK_F_RO), 0);
    assert_eq!(
        f & feature(VIRTIO_BLK_F_DISCARD),
        0,
        "no discard on a read-only disk"
    );

    assert_eq!(h.write(0, &[&[1u8; 512]]), (IOERR, 1));
    assert_eq!(h.write(7, &[&[1u8; 4096], &[2u8; 512]]), (IOERR, 1));
    assert_eq!(h.discard(&[(0, 8, 0)]), (UNSUPP, 1));
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    assert_eq!(h.read_ok(0, 128), before);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file is unchanged"
    );
}

#[test]
fn config_space_and_identity() {
    let dir = TestDir::new("blk");
    // A trailing partial sector is not part of the capacity.
    let path = image(&dir.path("disk.img"), MIB + 100, 1);
    let dev = Block::new(RawFile::open(&path, false).unwrap(), SERIAL).unwrap();
    assert_eq!(dev.device_type(), VIRTIO_ID_BLOCK);
    assert_eq!(dev.queue_max_sizes(), &[256]);
    let f = dev.device_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
    ] {
        assert_ne!(f & feature(bit), 0, "feature {bit}");
    }
    assert_eq!(f & feature(VIRTIO_BLK_F_RO), 0);
    let le32 = |off: u64| {
        let mut b = [0u8; 4];
        dev.read_config(off, &mut b);
        u32::from_le_bytes(b)
    };
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    assert_eq!(le32(8), 32 * 1024, "size_max");
    assert_eq!(le32(12), 254, "seg_max");
    assert_eq!(le32(20), 512, "blk_size");
    assert_eq!(le32(36), 1 << 22, "max_discard_sectors");
    assert_eq!(le32(40), 32, "max_discard_seg");
    assert_eq!(le32(44), 8, "discard_sector_alignment");
    assert_eq!(le32(200), 0, "past the end reads 0");
}

/// The device as the VMM runs it: an event-manager subscriber whose queue eventfd is
/// registered after activation and unregistered after a reset.
#[test]
fn event_manager_drives_the_queue() {
    let dir = TestDir::new("blk");
    let path = image(&dir.path("disk.img"), 64 * 1024, 6);
    let mem = test_mem();
    let dev = Block::new(RawFile::open(&path, false).unwrap(), SERIAL).unwrap();
    let dev = Arc::new(Mutex::new(dev));
    let mut mgr = Manager::new().unwrap();
    mgr.add_subscriber(dev.clone());

    let mut q = GuestQueue::new(&mem, 0x0, 0x10_0000, 0x10_0000);
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick = evt.try_clone().unwrap();
    let irq = VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    dev.lock()
        .unwrap()
        .activate(Activation::new(
            mem.clone(),
            vec![q.queue()],
            vec![evt],
            irq.clone(),
        ))
        .unwrap();
    mgr.run_with_timeout(0).unwrap(); // the wake-up: registers the queue eventfd

    let hdr = q.alloc(16);
    mem.write_slice(&[0u8; 16], GuestAddress(hdr)).unwrap(); // IN, sector 0
    let (data, status) = (q.alloc(512), q.alloc(1));
    q.add_chain(&[(hdr, 16, false), (data, 512, true), (status, 1, true)]);
    kick.write(1).unwrap();
    let used = run_until_used(&mut mgr, 10, || q.used());
    assert_eq!(used.len(), 1, "the request ran from the event loop");
    assert_eq!(used[0].1, 513);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(status)).unwrap(), OK);
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(data)).unwrap();
    assert_eq!(got, pattern(64 * 1024, 6)[..512]);
    assert_ne!(irq.status() & INTERRUPT_VRING, 0);

    dev.lock().unwrap().reset();
    for _ in 0..3 {
        mgr.run_with_timeout(0).unwrap();
    }
    assert!(!dev.lock().unwrap().is_active());
    assert_eq!(dev.lock().unwrap().acked_features(), 0);
}

/// With EVENT_IDX the device asks for a kick at the next chain and interrupts only when
/// the driver's `used_event` says so.
#[test]
fn event_idx_suppresses_interrupts_and_asks_for_kicks() {
    let dir = TestDir::new("blk");
    let path = image(&dir.path("disk.img"), 64 * 1024, 6);
    let mem = test_mem();
    let dev = Block::new(RawFile::open(&path, false).unwrap(), SERIAL).unwrap();
    let mut h = Harness::activate_with(&mem, dev, true);
    let qsize = u64::from(driver::QSIZE);
    let avail_event = h.q.mock.used_addr().unchecked_add(4 + 8 * qsize);
    let used_event = h.q.mock.avail_addr().unchecked_add(4 + 2 * qsize);

    // used_event 0: interrupt when the first entry is used.
    h.read_ok(0, 1);
    assert_eq!(h.irq.irq_evt().read().unwrap(), 1);
    assert_eq!(
        mem.read_obj::<u16>(avail_event).unwrap(),
        1,
        "kick me at chain 1"
    );
    // used_event still 0: no interrupt for the second.
    h.read_ok(0, 1);
    assert!(h.irq.irq_evt().read().is_err(), "interrupt suppressed");
    assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 2);
    // The driver asks to hear about entry 2 (the third).
    mem.write_obj(2u16, used_event).unwrap();
    h.read_ok(0, 1);
    assert_eq!(h.irq.irq_evt().read().unwrap(), 1);
}

#[test]
fn host_side_flush_works_on_every_backend() {
    // The VMM flushes a device before it copies its overlay into a snapshot.
    let dir = TestDir::new("blk");
    let base = image(&dir.path("base.img"), 4096, 1);
    let overlay = crate::virtio::block::Overlay::create(&base, dir.path("o.overlay")).unwrap();
    Block::new(overlay, b"o").unwrap().flush().unwrap();
    let ro = RawFile::open(&base, true).unwrap();
    Block::new(ro, b"r").unwrap().flush().unwrap();
    let rw = RawFile::open(&base, false).unwrap();
    Block::new(rw, b"w").unwrap().flush().unwrap();
}
