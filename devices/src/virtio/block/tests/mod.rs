//! Tests of the block device against virtio-queue's mock guest memory and real files.
//!
//! The harness plays the guest driver (it writes request chains and reads the used ring and
//! status bytes) and the event loop (a kick writes the queue eventfd and calls the device's
//! handler). Disk images live in a scratch directory per test.

mod backend;

mod framing;
mod io;
mod overlay;
mod robust;
mod transport;

use crate::virtio::test_queue as driver;
use driver::GuestQueue;

use std::path::{Path, PathBuf};

use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::consts::*;
use super::{Backend, Block};
use crate::virtio::{Activation, GuestMemory, VirtioDevice, VirtioInterrupt};

pub(super) const MEM_SIZE: usize = 16 << 20;
pub(super) const SERIAL: &[u8] = b"kiln-test-disk-0001";

pub(super) use crate::virtio::test_dir::TestDir;

pub(super) fn test_mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// `len` bytes that differ with `seed` and position (no two sectors alike).
pub(super) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251).to_le_bytes()[0] ^ (i / 512).to_le_bytes()[0].wrapping_add(seed))
        .collect()
}

/// An image file of `len` bytes filled with `pattern(len, seed)`.
pub(super) fn image(path: &Path, len: usize, seed: u8) -> PathBuf {
    std::fs::write(path, pattern(len, seed)).unwrap();
    path.to_path_buf()
}

pub(super) struct Harness<'m> {
    pub mem: &'m GuestMemory,
    pub dev: Block,
    pub q: GuestQueue<'m>,
    kick: EventFd,
    pub irq: VirtioInterrupt,
}

impl<'m> Harness<'m> {
    /// A device over `backend` that the "driver" has activated.
    pub(super) fn new(mem: &'m GuestMemory, backend: impl Into<Backend>) -> Self {
        Self::activate(mem, Block::new(backend, SERIAL).unwrap())
    }

    pub(super) fn activate(mem: &'m GuestMemory, dev: Block) -> Self {
        Self::activate_with(mem, dev, false)
    }

    /// Activate `dev`, with VIRTIO_RING_F_EVENT_IDX in use or not.
    pub(super) fn activate_with(mem: &'m GuestMemory, mut dev: Block, event_idx: bool) -> Self {
        let q = GuestQueue::new(mem, 0x0, 0x10_0000, 0xe0_0000);
        let mut queue = q.queue();
        queue.set_event_idx(event_idx);
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = evt.try_clone().unwrap();
        let irq = VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        dev.ack_features(dev.device_features());
        dev.activate(Activation::new(
            mem.clone(),
            vec![queue],
            vec![evt],
            irq.clone(),
        ))
        .unwrap();
        Self {
            mem,
            dev,
            q,
            kick,
            irq,
        }
    }

    /// Kick the queue and let the device handle it.
    pub(super) fn run(&mut self) {
        self.kick.write(1).unwrap();
        let fd = self.dev.queue_fd().unwrap();
        self.dev.handle_event(fd);
    }

    /// A readable request header in guest memory.
    pub(super) fn header(&mut self, ty: u32, sector: u64) -> u64 {
        let a = self.q.alloc(16);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(a)).unwrap();
        a
    }

    /// A status byte buffer, pre-set to 0xff so that a status the device did not write shows.
    pub(super) fn status_buf(&mut self) -> u64 {
        let a = self.q.alloc(1);
        self.mem.write_obj(0xffu8, GuestAddress(a)).unwrap();
        a
    }

    pub(super) fn status_at(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Submit one chain and return its used length (asserting it was used exactly once).
    pub(super) fn submit(&mut self, descs: &[(u64, u32, bool)]) -> u32 {
        let head = self.q.add_chain(descs);
        self.run();
        let used = self.q.used();
        assert_eq!(used.len(), 1, "one chain in, one used entry out: {used:?}");
        assert_eq!(used[0].0, head);
        used[0].1
    }

    /// A request with header `(ty, sector)`, these data descriptors and a status byte.
    /// Returns (status, used length).
    pub(super) fn request(&mut self, ty: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
        let h = self.header(ty, sector);
        let s = self.status_buf();
        let mut descs = vec![(h, 16, false)];
        descs.extend_from_slice(data);
        descs.push((s, 1, true));
        let used = self.submit(&descs);
        (self.status_at(s), used)
    }

    /// Read into data descriptors of `lens` bytes. Returns (status, used, the bytes).
    pub(super) fn read(&mut self, sector: u64, lens: &[u32]) -> (u8, u32, Vec<u8>) {
        let bufs: Vec<(u64, u32, bool)> = lens
            .iter()
            .map(|&l| {
                let a = self.q.alloc(u64::from(l));
                self.mem
                    .write_slice(&vec![0xee; l as usize], GuestAddress(a))
                    .unwrap();
                (a, l, true)
            })
            .collect();
        let (status, used) = self.request(VIRTIO_BLK_T_IN, sector, &bufs);
        let mut out = Vec::new();
        for (a, l, _) in bufs {
            let mut b = vec![0u8; l as usize];
            self.mem.read_slice(&mut b, GuestAddress(a)).unwrap();
            out.extend(b);
        }
        (status, used, out)
    }

    /// `n` sectors from `sector`, which must succeed.
    pub(super) fn read_ok(&mut self, sector: u64, n: u32) -> Vec<u8> {
        let (status, used, data) = self.read(sector, &[n * 512]);
        assert_eq!((status, used), (OK, n * 512 + 1));
        data
    }

    /// Write `chunks`, one data descriptor each. Returns (status, used).
    pub(super) fn write(&mut self, sector: u64, chunks: &[&[u8]]) -> (u8, u32) {
        let bufs: Vec<(u64, u32, bool)> = chunks
            .iter()
            .map(|c| {
                let a = self.q.alloc(c.len() as u64);
                self.mem.write_slice(c, GuestAddress(a)).unwrap();
                (a, u32::try_from(c.len()).unwrap(), false)
            })
            .collect();
        self.request(VIRTIO_BLK_T_OUT, sector, &bufs)
    }

    /// A write that must succeed.
    pub(super) fn write_ok(&mut self, sector: u64, data: &[u8]) {
        assert_eq!(self.write(sector, &[data]), (OK, 1));
    }

    /// DISCARD of `(sector, num_sectors, flags)` segments. Returns (status, used).
    pub(super) fn discard(&mut self, segs: &[(u64, u32, u32)]) -> (u8, u32) {
        let mut raw = Vec::new();
        for (sector, num, flags) in segs {
            raw.extend_from_slice(&sector.to_le_bytes());
            raw.extend_from_slice(&num.to_le_bytes());
            raw.extend_from_slice(&flags.to_le_bytes());
        }
        let a = self.q.alloc(raw.len() as u64);
        self.mem.write_slice(&raw, GuestAddress(a)).unwrap();
        let len = u32::try_from(raw.len()).unwrap();
        self.request(VIRTIO_BLK_T_DISCARD, 0, &[(a, len, false)])
    }
}

/// The status values as the guest reads them.
pub(super) const OK: u8 = 0;
pub(super) const IOERR: u8 = 1;
pub(super) const UNSUPP: u8 = 2;
const _: () = assert!(
    OK as u32 == VIRTIO_BLK_S_OK
        && IOERR as u32 == VIRTIO_BLK_S_IOERR
        && UNSUPP as u32 == VIRTIO_BLK_S_UNSUPP
);
