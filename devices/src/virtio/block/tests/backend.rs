//! The request layer against a fake disk: backend errors become IOERR, and without the
//! FLUSH feature every write is made durable before it completes (writethrough).

use std::io;

use virtio_queue::Queue;

use super::*;
use crate::virtio::block::request::{handle, Ctx};
use crate::virtio::block::{Disk, SERIAL_LEN};

#[derive(Default)]
struct FakeDisk {
    data: Vec<u8>,
    fail_io: bool,
    fail_flush: bool,
    flushes: usize,
    discards: Vec<(u64, u64)>,
}

impl Disk for FakeDisk {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.fail_io {
            return Err(io::Error::other("injected read error"));
        }
        let at = usize::try_from(offset).unwrap();
        buf.copy_from_slice(&self.data[at..at + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.fail_io {
            return Err(io::Error::other("injected write error"));
        }
        let at = usize::try_from(offset).unwrap();
        self.data[at..at + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.fail_flush {
            return Err(io::Error::other("injected flush error"));
        }
        self.flushes += 1;
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.fail_io {
            return Err(io::Error::other("injected discard error"));
        }
        self.discards.push((offset, len));
        Ok(())
    }
}

/// A guest queue and the device's view of it, driving `handle` directly.
struct Bench<'m> {
    mem: &'m GuestMemory,
    q: GuestQueue<'m>,
    queue: Queue,
    disk: FakeDisk,
    writethrough: bool,
}

impl<'m> Bench<'m> {
    fn new(mem: &'m GuestMemory) -> Self {
        let q = GuestQueue::new(mem, 0x0, 0x10_0000, 0x10_0000);
        let queue = q.queue();
        let disk = FakeDisk {
            data: vec![7; 64 * 1024],
            ..FakeDisk::default()
        };
        Self {
            mem,
            q,
            queue,
            disk,
            writethrough: false,
        }
    }

    /// Run a request of type `ty` at `sector` with one data buffer of `len` bytes (`write`:
    /// device-writable). Returns (status, used length).
    fn request(&mut self, ty: u32, sector: u64, len: u32, write: bool) -> (u8, u32) {
        let (hdr, data, status) = (
            self.q.alloc(16),
            self.q.alloc(u64::from(len)),
            self.q.alloc(1),
        );
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        if ty == VIRTIO_BLK_T_DISCARD {
            let mut seg = [0u8; 16];
            seg[..8].copy_from_slice(&sector.to_le_bytes());
            seg[8..12].copy_from_slice(&8u32.to_le_bytes());
            self.mem.write_slice(&seg, GuestAddress(data)).unwrap();
        }
        self.q
            .add_chain(&[(hdr, 16, false), (data, len, write), (status, 1, true)]);
        let chain = self.queue.pop_descriptor_chain(self.mem).unwrap();
        let (serial, mut scratch) = ([0u8; SERIAL_LEN], Vec::new());
        let mut ctx = Ctx {
            disk: &mut self.disk,
            serial: &serial,
            discard: true,
            writethrough: self.writethrough,
            scratch: &mut scratch,
            moved: 0,
        };
        let used = handle(self.mem, chain, &mut ctx);
        (self.mem.read_obj(GuestAddress(status)).unwrap(), used)
    }
}

#[test]
fn backend_errors_are_ioerr() {
    let mem = test_mem();
    let mut b = Bench::new(&mem);
    assert_eq!(b.request(VIRTIO_BLK_T_IN, 1, 512, true), (OK, 513));
    b.disk.fail_io = true;
    assert_eq!(b.request(VIRTIO_BLK_T_IN, 1, 512, true), (IOERR, 1));
    assert_eq!(b.request(VIRTIO_BLK_T_OUT, 1, 512, false), (IOERR, 1));
    assert_eq!(b.request(VIRTIO_BLK_T_DISCARD, 8, 16, false), (IOERR, 1));
    b.disk.fail_flush = true;
    assert_eq!(b.request(VIRTIO_BLK_T_FLUSH, 0, 0, true), (IOERR, 1));
    b.disk.fail_io = false;
    b.disk.fail_flush = false;
    assert_eq!(b.request(VIRTIO_BLK_T_OUT, 1, 512, false), (OK, 1));
}

#[test]
fn writes_are_durable_without_the_flush_feature() {
    let mem = test_mem();
    let mut b = Bench::new(&mem);
    // FLUSH negotiated: the guest flushes when it needs to.
    assert_eq!(b.request(VIRTIO_BLK_T_OUT, 1, 512, false), (OK, 1));
    assert_eq!(b.disk.flushes, 0);
    // Not negotiated: writes and discards are flushed before they complete; reads are not.
    b.writethrough = true;
    assert_eq!(b.request(VIRTIO_BLK_T_OUT, 1, 512, false), (OK, 1));
    assert_eq!(b.disk.flushes, 1);
    assert_eq!(b.request(VIRTIO_BLK_T_DISCARD, 8, 16, false), (OK, 1));
    assert_eq!(b.disk.discards, [(8 * 512, 8 * 512)]);
    assert_eq!(b.disk.flushes, 2);
    assert_eq!(b.request(VIRTIO_BLK_T_IN, 1, 512, true), (OK, 513));
    assert_eq!(b.disk.flushes, 2);
    // A failed flush fails the write.
    b.disk.fail_flush = true;
    assert_eq!(b.request(VIRTIO_BLK_T_OUT, 1, 512, false), (IOERR, 1));
}
