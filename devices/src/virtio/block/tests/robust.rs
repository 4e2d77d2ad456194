//! Hostile chains: each one completes with IOERR (or, when no status byte can be written,
//! is returned with used length 0), leaves the disk alone, and the next good request works.

use super::driver::{F_NEXT, F_WRITE};
use super::*;
use crate::virtio::block::RawFile;
use crate::virtio::Activation;

const DISK: usize = 64 * 1024;
const CAP: u64 = (DISK / 512) as u64;

/// A device over a fresh 64 KiB image, and the image's path.
fn setup<'m>(mem: &'m GuestMemory, dir: &TestDir) -> (Harness<'m>, PathBuf) {
    let path = image(&dir.path("disk.img"), DISK, 8);
    (
        Harness::new(mem, RawFile::open(&path, false).unwrap()),
        path,
    )
}

/// The device still serves a good write and read, and the rest of the disk is intact.
fn assert_alive(h: &mut Harness<'_>, path: &Path) {
    h.write_ok(CAP - 1, &[0x5a; 512]);
    assert_eq!(h.read_ok(CAP - 1, 1), [0x5a; 512]);
    let file = std::fs::read(path).unwrap();
    assert_eq!(
        file[..DISK - 512],
        pattern(DISK, 8)[..DISK - 512],
        "disk untouched"
    );
    h.write_ok(CAP - 1, &pattern(DISK, 8)[DISK - 512..]);
}

#[test]
fn bad_ranges_and_lengths_are_ioerr() {
    let (mem, dir) = (test_mem(), TestDir::new("blk"));
    let (mut h, path) = setup(&mem, &dir);
    let buf = |h: &mut Harness<'_>, len: u32, write: bool| (h.q.alloc(u64::from(len)), len, write);

    type Data = Vec<(u64, u32, bool)>;
    let cases: Vec<(&str, u32, u64, Data)> = vec![
        (
            "read past the end",
            VIRTIO_BLK_T_IN,
            CAP,
            vec![buf(&mut h, 512, true)],
        ),
        (
            "write straddling the end",
            VIRTIO_BLK_T_OUT,
            CAP - 1,
            vec![buf(&mut h, 1024, false)],
        ),
        (
            "sector * 512 overflows",
            VIRTIO_BLK_T_IN,
            u64::MAX / 256,
            vec![buf(&mut h, 512, true)],
        ),
        (
            "sector + len overflows",
            VIRTIO_BLK_T_OUT,
            u64::MAX / 512,
            vec![buf(&mut h, 1024, false)],
        ),
        (
            "sector u64::MAX",
            VIRTIO_BLK_T_IN,
            u64::MAX,
            vec![buf(&mut h, 512, true)],
        ),
        (
            "read of 100 bytes",
            VIRTIO_BLK_T_IN,
            0,
            vec![buf(&mut h, 100, true)],
        ),
        (
            "write of 513 bytes",
            VIRTIO_BLK_T_OUT,
            0,
            vec![buf(&mut h, 513, false)],
        ),
        (
            "read into a readable buffer",
            VIRTIO_BLK_T_IN,
            0,
            vec![buf(&mut h, 512, false)],
        ),
        (
            "write from a writable buffer",
            VIRTIO_BLK_T_OUT,
            0,
            vec![buf(&mut h, 512, true)],
        ),
        (
            "write with mixed directions",
            VIRTIO_BLK_T_OUT,
            0,
            vec![buf(&mut h, 512, false), buf(&mut h, 512, true)],
        ),
        (
            "GET_ID into a readable buffer",
            VIRTIO_BLK_T_GET_ID,
            0,
            vec![buf(&mut h, 20, false)],
        ),
        ("GET_ID without a buffer", VIRTIO_BLK_T_GET_ID, 0, vec![]),
        (
            "data outside memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![(MEM_SIZE as u64 + 4096, 512, true)],
        ),
        (
            "write data outside memory",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(MEM_SIZE as u64, 512, false)],
        ),
        (
            "data across the end of memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![(MEM_SIZE as u64 - 512, 1024, true)],
        ),
        (
            "data address wraps",
            VIRTIO_BLK_T_IN,
            0,
            vec![(u64::MAX - 255, 512, true)],
        ),
        (
            "huge data length",
            VIRTIO_BLK_T_IN,
            0,
            vec![(0x10_0000, 0xffff_fe00, true)],
        ),
        (
            "discard segment of 8 bytes",
            VIRTIO_BLK_T_DISCARD,
            0,
            vec![buf(&mut h, 8, false)],
        ),
    ];
    for (what, ty, sector, data) in cases {
        assert_eq!(h.request(ty, sector, &data), (IOERR, 1), "{what}");
        assert_alive(&mut h, &path);
    }
}

#[test]
fn bad_headers_are_ioerr() {
    let (mem, dir) = (test_mem(), TestDir::new("blk"));
    let (mut h, path) = setup(&mem, &dir);
    let data = h.q.alloc(512);
    mem.write_slice(&[1u8; 512], GuestAddress(data)).unwrap();
    let hdr = h.header(VIRTIO_BLK_T_OUT, 0);
    let outside = MEM_SIZE as u64 + 64;
    for (what, header) in [
        ("device-writable header", (hdr, 16, true)),
        ("short header", (hdr, 8, false)),
        ("header outside memory", (outside, 16, false)),
        (
            "header across the end of memory",
            (MEM_SIZE as u64 - 8, 16, false),
        ),
    ] {
        let s = h.status_buf();
        let used = h.submit(&[header, (data, 512, false), (s, 1, true)]);
        assert_eq!((h.status_at(s), used), (IOERR, 1), "{what}");
        assert_alive(&mut h, &path);
    }
}

#[test]
fn chains_without_a_usable_status_are_returned_unused() {
    let (mem, dir) = (test_mem(), TestDir::new("blk"));
    let (mut h, path) = setup(&mem, &dir);
    let data = h.q.alloc(512);
    mem.write_slice(&[1u8; 512], GuestAddress(data)).unwrap();
    let hdr = h.header(VIRTIO_BLK_T_OUT, 0);
    let s = h.status_buf();
    for (what, chain) in [
        ("header only", vec![(hdr, 16, false)]),
        (
            "no status: ends in the write data",
            vec![(hdr, 16, false), (data, 512, false)],
        ),
        (
            "readable status",
            vec![(hdr, 16, false), (data, 512, false), (s, 1, false)],
        ),
        (
            "empty status",
            vec![(hdr, 16, false), (data, 512, false), (s, 0, true)],
        ),
        (
            "status outside memory",
            vec![
                (hdr, 16, false),
                (data, 512, false),
                (MEM_SIZE as u64, 1, true),
            ],
        ),
    ] {
        assert_eq!(h.submit(&chain), 0, "{what}");
        assert_eq!(h.status_at(s), 0xff, "{what}: no status written");
        assert_alive(&mut h, &path);
    }
}

#[test]
fn broken_and_looping_chains_are_returned_unused() {
    let (mem, dir) = (test_mem(), TestDir::new("blk"));
    let (mut h, path) = setup(&mem, &dir);
    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    let (data, s) = (h.q.alloc(512), h.status_buf());
    // Each chain's `next` fields are relative to its head.
    let chains: [&[(u64, u32, u16, u16)]; 3] = [
        // header -> data -> header -> ...
        &[(hdr, 16, F_NEXT, 1), (data, 512, F_NEXT | F_WRITE, 0)],
        // a descriptor that points at itself
        &[(s, 1, F_NEXT | F_WRITE, 0)],
        // next index outside the descriptor table
        &[(hdr, 16, F_NEXT, 300), (s, 1, F_WRITE, 0)],
    ];
    for chain in chains {
        let head = h.q.add_raw(chain);
        h.run();
        assert_eq!(h.q.used(), [(head, 0)], "{chain:?}");
        assert_eq!(h.status_at(s), 0xff);
        assert_alive(&mut h, &path);
    }
}

#[test]
fn corrupt_avail_ring_does_not_spin() {
    let (mem, dir) = (test_mem(), TestDir::new("blk"));
    let (mut h, _) = setup(&mem, &dir);
    // The driver claims 1000 new chains in a 256-entry ring.
    let idx_addr = GuestAddress(h.q.mock.avail_addr().0 + 2);
    mem.write_obj(1000u16, idx_addr).unwrap();
    h.run(); // returns: nothing used, no hang
    assert!(h.q.used().is_empty());
    assert!(h.irq.is_broken(), "not marked DEVICE_NEEDS_RESET");
    // Broken stays broken until a reset, even once the ring looks sane again.
    mem.write_obj(0u16, idx_addr).unwrap();
    let (hdr, s) = (h.header(VIRTIO_BLK_T_IN, 0), h.status_buf());
    h.q.add_chain(&[(hdr, 16, false), (s, 1, true)]);
    h.run();
    assert!(h.q.used().is_empty(), "a broken device served a request");
    // The driver resets the device and sets it up again (a fresh activation).
    drop(h);
    let (mut h, path) = setup(&mem, &dir);
    assert_alive(&mut h, &path);
    // An avail entry naming a descriptor past the table.
    let ring_entry = GuestAddress(h.q.mock.avail_addr().0 + 4);
    let idx: u16 = mem.read_obj(idx_addr).unwrap();
    mem.write_obj(999u16, ring_entry.unchecked_add(2 * u64::from(idx % 256)))
        .unwrap();
    mem.write_obj(idx.wrapping_add(1), idx_addr).unwrap();
    h.run();
    // There is no descriptor 999 to give back (add_used refuses it); it is skipped.
    assert!(h.q.used().is_empty());
    assert_alive(&mut h, &path);
}

/// A ring whose used ring lies over its avail ring, with next_used ahead of next_avail
/// (a restored state can say so): every used entry makes a new available one. One call
/// serves at most CHAIN_BUDGET requests, then re-kicks the queue and returns.
#[test]
fn a_ring_that_refills_itself_does_not_hold_the_event_loop() {
    use crate::virtio::block::device::CHAIN_BUDGET;

    let (mem, dir) = (test_mem(), TestDir::new("blk"));
    let (mut h, path) = setup(&mem, &dir);
    let (hdr, s) = (h.header(VIRTIO_BLK_T_FLUSH, 0), h.status_buf());
    let head = h.q.add_chain(&[(hdr, 16, false), (s, 1, true)]);
    let queue = h.q.self_refilling(head);
    let mut dev = Block::new(RawFile::open(&path, false).unwrap(), SERIAL).unwrap();
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kicked = evt.try_clone().unwrap();
    let irq = VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    dev.ack_features(dev.device_features());
    dev.activate(Activation::new(mem.clone(), vec![queue], vec![evt], irq))
        .unwrap();

    driver::assert_drain_yields(CHAIN_BUDGET, &kicked, move || {
        dev.process_queue();
        dev.queues.active.map(|a| a.queues[0].next_avail())
    });
}

/// One request may move at most MAX_REQUEST_LEN bytes (seg_max segments of size_max, as the
/// config space advertises): a larger read or write completes with IOERR before any data
/// moves, and a request exactly at the cap goes through.
#[test]
fn requests_over_the_size_cap_are_ioerr_and_move_no_data() {
    use crate::virtio::block::MAX_REQUEST_LEN;
    const BIG_DISK: usize = 10 << 20;
    let (mem, dir) = (test_mem(), TestDir::new("blk"));
    let path = image(&dir.path("disk.img"), BIG_DISK, 4);
    let mut h = Harness::new(&mem, RawFile::open(&path, false).unwrap());
    let cap = u32::try_from(MAX_REQUEST_LEN).unwrap();
    assert_eq!(cap % 1024, 0, "the cap is whole sectors, in two halves");
    // Data lies past the harness's header and status buffers.
    let base = 0x20_0000u64;
    let half = cap / 2;
    let over = |writable| {
        [
            (base, half, writable),
            (base + u64::from(half), half + 512, writable),
        ]
    };
    let fill = vec![0xab; (cap + 512) as usize];

    mem.write_slice(&fill, GuestAddress(base)).unwrap();
    assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, &over(false)), (IOERR, 1));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        pattern(BIG_DISK, 4),
        "an oversized write changed the disk"
    );

    mem.write_slice(&vec![0xee; fill.len()], GuestAddress(base))
        .unwrap();
    assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, &over(true)), (IOERR, 1));
    let mut back = vec![0u8; fill.len()];
    mem.read_slice(&mut back, GuestAddress(base)).unwrap();
    assert!(
        back.iter().all(|&b| b == 0xee),
        "an oversized read wrote guest memory"
    );

    // At the cap exactly: fine.
    mem.write_slice(&fill[..cap as usize], GuestAddress(base))
        .unwrap();
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 0, &[(base, cap, false)]),
        (OK, 1)
    );
    assert_eq!(
        std::fs::read(&path).unwrap()[..cap as usize],
        fill[..cap as usize]
    );
}

/// Budget by work, not only by count: large requests end a drain sooner (each costs one
/// unit plus one per BYTES_PER_UNIT it moves), the device re-kicks itself, and the rest run
/// on the next turns.
#[test]
fn large_requests_spend_the_drain_budget_sooner() {
    use crate::virtio::block::device::{BYTES_PER_UNIT, CHAIN_BUDGET};
    const N: usize = 60;
    let (mem, dir) = (test_mem(), TestDir::new("blk"));
    let path = image(&dir.path("disk.img"), 1 << 20, 2);
    let mut h = Harness::new(&mem, RawFile::open(&path, false).unwrap());
    let big = 1u32 << 20;
    for _ in 0..N {
        let (hdr, s) = (h.header(VIRTIO_BLK_T_OUT, 0), h.status_buf());
        h.q.add_chain(&[(hdr, 16, false), (0x20_0000, big, false), (s, 1, true)]);
    }
    h.run();
    let first = h.q.used().len();
    let cost = 1 + usize::try_from(u64::from(big) / BYTES_PER_UNIT).unwrap();
    assert_eq!(
        first,
        CHAIN_BUDGET.div_ceil(cost),
        "requests in the first turn"
    );
    let mut kick = 0u64;
    // SAFETY: reads 8 bytes into `kick` from the device's nonblocking queue eventfd.
    let n = unsafe {
        libc::read(
            h.dev.queue_fd().unwrap(),
            std::ptr::addr_of_mut!(kick).cast(),
            8,
        )
    };
    assert_eq!((n, kick), (8, 1), "the device re-kicked its queue");
    let mut total = first;
    for _ in 0..N {
        if total == N {
            break;
        }
        h.run();
        total += h.q.used().len();
    }
    assert_eq!(total, N);
}
