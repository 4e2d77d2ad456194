//! The whole stack as the VMM will wire it: a driver negotiates features and reads the
//! config space through the MMIO registers, and event-manager runs the device.

use std::sync::{Arc, Mutex};

use super::*;
use crate::bus::BusDevice;
use crate::virtio::block::RawFile;
use crate::virtio::test_rig::Wired;
use crate::virtio::{feature, status, QUEUE_NOTIFY_OFFSET, VIRTIO_F_VERSION_1};

#[test]
fn mmio_transport_and_event_manager_end_to_end() {
    let dir = TestDir::new("blk");
    let path = image(&dir.path("disk.img"), 1 << 20, 4);
    let mem = test_mem();
    let dev = Block::new(RawFile::open(&path, false).unwrap(), SERIAL).unwrap();
    let dev = Arc::new(Mutex::new(dev));
    let mut wired = Wired::new(&mem, &dev);
    let w = &mut wired;

    assert_eq!(w.r(0x08), 2, "DeviceID");
    w.w(0x70, status::ACKNOWLEDGE | status::DRIVER);
    w.w(0x14, 0);
    let offered = w.r(0x10);
    let want = feature(VIRTIO_BLK_F_SEG_MAX)
        | feature(VIRTIO_BLK_F_BLK_SIZE)
        | feature(VIRTIO_BLK_F_FLUSH);
    assert_eq!(u64::from(offered) & want, want);
    w.w(0x24, 0);
    w.w(0x20, u32::try_from(want).unwrap());
    w.w(0x24, 1);
    w.w(0x20, 1); // VERSION_1
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    w.w(0x70, s);
    assert_eq!(w.r(0x70), s, "features accepted");
    let mut cap = [0u8; 8];
    w.t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    assert_eq!(w.r(0x100 + 20), 512, "blk_size");

    let mut q = GuestQueue::new(&mem, 0x0, 0x10_0000, 0x10_0000);
    w.set_queue(0, &q);
    w.w(0x70, s | status::DRIVER_OK);
    assert_eq!(w.t.device_status(), s | status::DRIVER_OK);
    assert_eq!(
        dev.lock().unwrap().acked_features(),
        want | feature(VIRTIO_F_VERSION_1)
    );

    // Write sector 3 from the guest, notifying through QueueNotify.
    let hdr = q.alloc(16);
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    h[8..].copy_from_slice(&3u64.to_le_bytes());
    mem.write_slice(&h, GuestAddress(hdr)).unwrap();
    let (data, st) = (q.alloc(512), q.alloc(1));
    mem.write_slice(&[0x33; 512], GuestAddress(data)).unwrap();
    q.add_chain(&[(hdr, 16, false), (data, 512, false), (st, 1, true)]);
    w.w(QUEUE_NOTIFY_OFFSET, 0);
    let used = w.run_until_used(10, || q.used());
    assert_eq!(used.len(), 1, "the request ran from the event loop");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(st)).unwrap(), OK);
    assert_eq!(std::fs::read(&path).unwrap()[3 * 512..4 * 512], [0x33; 512]);
    assert_eq!(w.r(0x60) & 1, 1, "used-buffer interrupt pending");

    // A driver reset takes the queue out of the event loop; a new activation (new rings)
    // brings it back.
    w.w(0x70, 0);
    w.run(3);
    assert!(!dev.lock().unwrap().is_active());
    // Take the closed queue eventfd's number, so the new one differs: a stale registration
    // of the old number would then go unnoticed by the device.
    let _hold = EventFd::new(0).unwrap();
    let mut q = GuestQueue::new(&mem, 0x8000, 0x20_0000, 0x10_0000);
    w.w(0x70, status::ACKNOWLEDGE | status::DRIVER);
    w.w(0x24, 1);
    w.w(0x20, 1);
    w.w(
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    w.set_queue(0, &q);
    w.w(0x70, s | status::DRIVER_OK);
    let hdr = q.alloc(16);
    mem.write_slice(&h, GuestAddress(hdr)).unwrap();
    mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(hdr)).unwrap();
    let (data, st) = (q.alloc(512), q.alloc(1));
    q.add_chain(&[(hdr, 16, false), (data, 512, true), (st, 1, true)]);
    w.w(QUEUE_NOTIFY_OFFSET, 0);
    let used = w.run_until_used(10, || q.used());
    assert_eq!(used, [(0, 513)], "served on the new rings");
    let mut got = [0u8; 512];
    mem.read_slice(&mut got, GuestAddress(data)).unwrap();
    assert_eq!(got, [0x33; 512]);
}
