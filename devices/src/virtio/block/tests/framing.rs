//! Message framing (virtio 1.2, 2.6.4): data may share the header's descriptor or the
//! status's; the status is the last byte of the chain.

use super::*;
use crate::virtio::block::RawFile;

fn setup<'m>(mem: &'m GuestMemory, dir: &TestDir) -> (Harness<'m>, PathBuf) {
    let path = image(&dir.path("disk.img"), 64 * 1024, 3);
    (
        Harness::new(mem, RawFile::open(&path, false).unwrap()),
        path,
    )
}

#[test]
fn data_and_status_in_one_descriptor() {
    let (mem, dir) = (test_mem(), TestDir::new("blk"));
    let (mut h, _path) = setup(&mem, &dir);
    let hdr = h.header(VIRTIO_BLK_T_IN, 2);
    let buf = h.q.alloc(1024 + 1);
    mem.write_slice(&[0xee; 1025], GuestAddress(buf)).unwrap();
    let tail = h.q.alloc(512 + 1);
    assert_eq!(
        h.submit(&[(hdr, 16, false), (buf, 512, true), (tail, 513, true)]),
        1025
    );
    let mut got = vec![0u8; 1024];
    mem.read_slice(&mut got[..512], GuestAddress(buf)).unwrap();
    mem.read_slice(&mut got[512..], GuestAddress(tail)).unwrap();
    assert_eq!(got, pattern(64 * 1024, 3)[1024..2048]);
    assert_eq!(
        h.status_at(tail + 512),
        OK,
        "the status is the chain's last byte"
    );

    // GET_ID with the serial and the status in one 21-byte descriptor.
    let hdr = h.header(VIRTIO_BLK_T_GET_ID, 0);
    let both = h.q.alloc(21);
    assert_eq!(h.submit(&[(hdr, 16, false), (both, 21, true)]), 21);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(both)).unwrap();
    assert_eq!(id[..SERIAL.len()], *SERIAL);
    assert_eq!(h.status_at(both + 20), OK);
}

#[test]
fn header_and_data_in_one_descriptor() {
    let (mem, dir) = (test_mem(), TestDir::new("blk"));
    let (mut h, path) = setup(&mem, &dir);
    let hdr = h.header(VIRTIO_BLK_T_OUT, 5);
    // The header's buffer continues with 1024 bytes of data (alloc is contiguous here).
    let data = h.q.alloc(1024);
    assert_eq!(data, hdr + 16);
    mem.write_slice(&[0x42; 1024], GuestAddress(data)).unwrap();
    let s = h.status_buf();
    assert_eq!(h.submit(&[(hdr, 16 + 1024, false), (s, 1, true)]), 1);
    assert_eq!(h.status_at(s), OK);
    assert_eq!(
        std::fs::read(&path).unwrap()[5 * 512..7 * 512],
        [0x42; 1024]
    );
}

#[test]
fn shared_descriptors_with_the_wrong_direction_are_ioerr() {
    let (mem, dir) = (test_mem(), TestDir::new("blk"));
    let (mut h, path) = setup(&mem, &dir);
    // A write whose status descriptor carries writable bytes before the status.
    let hdr = h.header(VIRTIO_BLK_T_OUT, 0);
    let (data, st) = (h.q.alloc(512), h.q.alloc(2));
    assert_eq!(
        h.submit(&[(hdr, 16, false), (data, 512, false), (st, 2, true)]),
        1
    );
    assert_eq!(h.status_at(st + 1), IOERR);
    // A read whose header descriptor carries readable bytes after the header.
    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    h.q.alloc(512);
    let (data, s) = (h.q.alloc(512), h.status_buf());
    assert_eq!(
        h.submit(&[(hdr, 16 + 512, false), (data, 512, true), (s, 1, true)]),
        1
    );
    assert_eq!(h.status_at(s), IOERR);
    assert_eq!(std::fs::read(&path).unwrap(), pattern(64 * 1024, 3));
}
