//! The copy-on-write overlay: isolation between overlays of one base, read-modify-write of
//! partial clusters, discard, the base never written, and save/restore of the bitmap.

use super::*;
use crate::persist::Persist;
use crate::virtio::block::{
    BackendState, BlockError, BlockState, Disk, Overlay, BLOCK_STATE_VERSION, CLUSTER_SIZE,
    MAX_OVERLAY_LEN,
};
use crate::virtio::QueueRestoreArgs;

const BASE: usize = 256 * 1024;

/// A base image of BASE bytes and its contents.
fn base(dir: &TestDir) -> (PathBuf, Vec<u8>) {
    let path = image(&dir.path("base.img"), BASE, 2);
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

fn overlay(dir: &TestDir, base: &Path, name: &str) -> Overlay {
    Overlay::create(base, dir.path(name)).unwrap()
}

#[test]
fn two_overlays_see_only_their_own_writes() {
    let (mem_a, mem_b, dir) = (test_mem(), test_mem(), TestDir::new("blk"));
    let (base_path, orig) = base(&dir);
    let mut a = Harness::new(&mem_a, overlay(&dir, &base_path, "a.ovl"));
    let mut b = Harness::new(&mem_b, overlay(&dir, &base_path, "b.ovl"));

    a.write_ok(8, &[0xaa; 4096]);
    b.write_ok(8, &[0xbb; 4096]);
    b.write_ok(100, &[0xbc; 1024]);
    assert_eq!(a.read_ok(8, 8), [0xaa; 4096]);
    assert_eq!(b.read_ok(8, 8), [0xbb; 4096]);
    assert_eq!(
        a.read_ok(100, 2),
        orig[100 * 512..102 * 512],
        "a does not see b's write"
    );
    assert_eq!(b.read_ok(100, 2), [0xbc; 1024]);
    // Everything else reads as the base, in one request spanning both sources.
    let mut want = orig[..64 * 512].to_vec();
    want[8 * 512..16 * 512].fill(0xaa);
    assert_eq!(a.read_ok(0, 64), want);
    assert_eq!(
        std::fs::read(&base_path).unwrap(),
        orig,
        "the base is never written"
    );
}

#[test]
fn partial_cluster_writes_keep_the_base_data() {
    let (mem, dir) = (test_mem(), TestDir::new("blk"));
    let (base_path, orig) = base(&dir);
    let mut h = Harness::new(&mem, overlay(&dir, &base_path, "a.ovl"));
    let mut model = orig.clone();

    // One sector in the middle of cluster 1.
    h.write_ok(9, &[1; 512]);
    model[9 * 512..10 * 512].fill(1);
    assert_eq!(h.read_ok(8, 8), model[8 * 512..16 * 512]);
    // Sectors 15..25: the tail of cluster 1, all of cluster 2, the head of cluster 3.
    let data = pattern(10 * 512, 9);
    h.write_ok(15, &data);
    model[15 * 512..25 * 512].copy_from_slice(&data);
    // A partial write into a cluster already in the overlay.
    h.write_ok(26, &[3; 512]);
    model[26 * 512..27 * 512].fill(3);
    assert_eq!(h.read_ok(0, 64), model[..64 * 512]);
    assert_eq!(h.read_ok(0, 512), model, "the whole disk");

    // The overlay file holds whole clusters 1..=3 (merged) and nothing else.
    let ovl = std::fs::read(dir.path("a.ovl")).unwrap();
    assert_eq!(ovl.len(), BASE);
    let cs = usize::try_from(CLUSTER_SIZE).unwrap();
    assert_eq!(ovl[cs..4 * cs], model[cs..4 * cs]);
    assert!(ovl[..cs].iter().chain(&ovl[4 * cs..]).all(|&b| b == 0));
    assert_eq!(std::fs::read(&base_path).unwrap(), orig);
}

#[test]
fn overlay_discard_reads_back_zeros_not_the_base() {
    let (mem, dir) = (test_mem(), TestDir::new("blk"));
    let (base_path, orig) = base(&dir);
    let mut h = Harness::new(&mem, overlay(&dir, &base_path, "a.ovl"));
    h.write_ok(40, &[7; 4096]); // cluster 5 in the overlay, then discarded
                                // Whole clusters 2 and 5..=6, and two sectors of cluster 0.
    assert_eq!(h.discard(&[(16, 8, 0), (40, 16, 0), (3, 2, 0)]), (OK, 1));
    let mut model = orig.clone();
    model[16 * 512..24 * 512].fill(0);
    model[40 * 512..56 * 512].fill(0);
    model[3 * 512..5 * 512].fill(0);
    assert_eq!(h.read_ok(0, 512), model);
    assert_eq!(std::fs::read(&base_path).unwrap(), orig);
    let state = h.dev.save();
    let BackendState::Overlay { bitmap, .. } = &state.backend else {
        panic!("{state:?}")
    };
    assert_eq!(
        bitmap[0], 0b110_0101,
        "clusters 0, 2, 5 and 6 live in the overlay"
    );
}

/// Writes and discards at odd offsets against a byte model, on a disk whose last cluster
/// is short, straight through the `Disk` interface.
#[test]
fn overlay_matches_a_model_at_odd_offsets() {
    let dir = TestDir::new("blk");
    let len = 3 * 4096 + 1536;
    let base_path = image(&dir.path("base.img"), len, 5);
    let orig = std::fs::read(&base_path).unwrap();
    let mut ovl = overlay(&dir, &base_path, "a.ovl");
    assert_eq!(ovl.len(), len as u64);
    let mut model = orig.clone();
    let mut seed = 12345u64;
    let mut next = |m: usize| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        usize::try_from(seed >> 33).unwrap() % m
    };
    for round in 0..200 {
        let off = next(len);
        let n = 1 + next(len - off);
        if round % 4 == 3 {
            ovl.discard(off as u64, n as u64).unwrap();
            model[off..off + n].fill(0);
        } else {
            let data = pattern(n, u8::try_from(round % 256).unwrap());
            ovl.write_at(&data, off as u64).unwrap();
            model[off..off + n].copy_from_slice(&data);
        }
        let mut got = vec![0u8; len];
        ovl.read_at(&mut got, 0).unwrap();
        assert_eq!(got, model, "round {round}: {n} bytes at {off}");
        let (o, m) = (next(len), next(64));
        let m = m.min(len - o);
        let mut piece = vec![0u8; m];
        ovl.read_at(&mut piece, o as u64).unwrap();
        assert_eq!(piece, model[o..o + m]);
    }
    assert_eq!(std::fs::read(&base_path).unwrap(), orig);
}

#[test]
fn overlay_state_round_trip() {
    let (mem, dir) = (test_mem(), TestDir::new("blk"));
    let (base_path, orig) = base(&dir);
    let mut h = Harness::new(&mem, overlay(&dir, &base_path, "a.ovl"));
    h.write_ok(9, &[1; 512]);
    h.write_ok(64, &pattern(8192, 4));
    h.discard(&[(128, 8, 0)]);
    let before = h.read_ok(0, 512);
    let state = h.dev.save();
    assert_eq!(state.version, BLOCK_STATE_VERSION);
    assert_eq!(state.queues.len(), 1);
    assert_eq!(state.config.capacity, 512);
    let json = serde_json::to_string(&state).unwrap();
    let back: BlockState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);

    // Restored with its queue: active, and saves the same state.
    let args = |interrupt: &VirtioInterrupt| QueueRestoreArgs {
        mem: mem.clone(),
        queue_evts: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
        interrupt: interrupt.clone(),
    };
    let restored = Block::restore(args(&h.irq), &back).unwrap();
    assert!(restored.is_active());
    assert_eq!(restored.save(), state);
    drop(restored);

    // Restored before activation, then driven by a new guest: the same disk contents.
    drop(h);
    let mut idle = back.clone();
    idle.queues.clear();
    let no_queue = QueueRestoreArgs {
        mem: mem.clone(),
        queue_evts: vec![],
        interrupt: VirtioInterrupt::new(EventFd::new(0).unwrap()),
    };
    let dev = Block::restore(no_queue, &idle).unwrap();
    assert!(!dev.is_active());
    let mem2 = test_mem();
    let mut h2 = Harness::activate(&mem2, dev);
    assert_eq!(h2.read_ok(0, 512), before);
    let mut id = [0u8; 20];
    id[..SERIAL.len()].copy_from_slice(SERIAL);
    assert_eq!(h2.dev.save().serial, id);
    assert_eq!(std::fs::read(&base_path).unwrap(), orig);

    // States that cannot be restored.
    let restore = |s: &BlockState| Block::restore(args(&h2.irq), s);
    let mut bad = state.clone();
    bad.version = 9;
    assert!(matches!(
        restore(&bad),
        Err(BlockError::StateVersion { found: 9, .. })
    ));
    let mut bad = state.clone();
    bad.config.capacity += 1;
    assert!(matches!(restore(&bad), Err(BlockError::BadState(_))));
    let mut bad = state.clone();
    bad.queues[0].size = 3;
    assert!(matches!(restore(&bad), Err(BlockError::BadQueues(_))));
    let mut bad = state.clone();
    if let BackendState::Overlay { cluster_size, .. } = &mut bad.backend {
        *cluster_size = 65536;
    }
    assert!(matches!(restore(&bad), Err(BlockError::BadState(_))));
    let mut bad = state.clone();
    if let BackendState::Overlay { bitmap, .. } = &mut bad.backend {
        bitmap.push(0);
    }
    assert!(matches!(
        restore(&bad),
        Err(BlockError::OverlayMismatch { .. })
    ));
    let mut bad = state;
    if let BackendState::Overlay { bitmap, .. } = &mut bad.backend {
        // The base has exactly 64 clusters: every bit of the one word is a real cluster.
        bitmap[0] = u64::MAX;
    }
    assert!(restore(&bad).is_ok(), "a full word of 64 clusters is fine");
}

#[test]
fn overlay_files_are_checked() {
    let dir = TestDir::new("blk");
    let (base_path, _) = base(&dir);
    let _a = overlay(&dir, &base_path, "a.ovl");
    assert!(
        matches!(
            Overlay::create(&base_path, dir.path("a.ovl")),
            Err(BlockError::Open { .. })
        ),
        "an existing overlay is never clobbered"
    );
    assert!(matches!(
        Overlay::create(dir.path("missing.img"), dir.path("b.ovl")),
        Err(BlockError::Open { .. })
    ));
    // A base whose cluster count is not a multiple of 64 rejects bits past its end.
    let small = image(&dir.path("small.img"), 10 * 4096, 1);
    let s = overlay(&dir, &small, "s.ovl");
    assert_eq!(s.bitmap(), [0]);
    drop(s);
    assert!(Overlay::reopen(&small, dir.path("s.ovl"), vec![1 << 9]).is_ok());
    assert!(matches!(
        Overlay::reopen(&small, dir.path("s.ovl"), vec![1 << 10]),
        Err(BlockError::OverlayMismatch { .. })
    ));
    // A base too large for an in-memory bitmap (sparse: no disk space used).
    let huge = dir.path("huge.img");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(MAX_OVERLAY_LEN + 4096)
        .unwrap();
    assert!(matches!(
        Overlay::create(&huge, dir.path("h.ovl")),
        Err(BlockError::OverlayMismatch { .. })
    ));
    assert!(!dir.path("h.ovl").exists());
    // An overlay of another size.
    assert!(matches!(
        Overlay::reopen(&base_path, dir.path("s.ovl"), vec![0; 1]),
        Err(BlockError::OverlayMismatch { .. })
    ));
}
