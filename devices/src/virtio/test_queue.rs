//! The guest driver's side of a virtqueue, for device tests: descriptor chains in, used
//! entries out.

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress};

use crate::virtio::GuestMemory;

pub(crate) const QSIZE: u16 = 256;
pub(crate) const F_NEXT: u16 = 1;
pub(crate) const F_WRITE: u16 = 2;
const _: () = assert!(F_NEXT as u32 == VRING_DESC_F_NEXT && F_WRITE as u32 == VRING_DESC_F_WRITE);

/// The request queue as the guest driver sees it.
pub(crate) struct GuestQueue<'m> {
    mem: &'m GuestMemory,
    pub(crate) mock: MockSplitQueue<'m, GuestMemory>,
    next_desc: u16,
    buf_base: u64,
    buf_len: u64,
    buf_off: u64,
    used_seen: u16,
}

impl<'m> GuestQueue<'m> {
    pub(crate) fn new(mem: &'m GuestMemory, ring: u64, buf_base: u64, buf_len: u64) -> Self {
        Self {
            mem,
            mock: MockSplitQueue::create(mem, GuestAddress(ring), QSIZE),
            next_desc: 0,
            buf_base,
            buf_len,
            buf_off: 0,
            used_seen: 0,
        }
    }

    /// Guest memory for a buffer of `len` bytes (recycled round-robin).
    pub(crate) fn alloc(&mut self, len: u64) -> u64 {
        if self.buf_off + len > self.buf_len {
            self.buf_off = 0;
        }
        let addr = self.buf_base + self.buf_off;
        self.buf_off += len.div_ceil(16) * 16;
        addr
    }

    /// Make `(addr, len, device_writable)` descriptors one available chain.
    pub(crate) fn add_chain(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let n = u16::try_from(descs.len()).unwrap();
        let head = self.reserve(n);
        let raw: Vec<(u64, u32, u16, u16)> = descs
            .iter()
            .zip(0u16..)
            .map(|(&(addr, len, write), i)| {
                let mut flags = if write { F_WRITE } else { 0 };
                let mut next = 0;
                if i + 1 < n {
                    flags |= F_NEXT;
                    next = head + i + 1;
                }
                (addr, len, flags, next)
            })
            .collect();
        self.store(&raw, head);
        head
    }

    /// Add `(addr, len, flags, next)` descriptors verbatim at `head..` (`next` relative to
    /// `head`), the first one as an available chain: for broken and looping chains.
    pub(crate) fn add_raw(&mut self, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let head = self.reserve(u16::try_from(descs.len()).unwrap());
        let abs: Vec<_> = descs
            .iter()
            .map(|&(a, l, f, next)| (a, l, f, head.wrapping_add(next)))
            .collect();
        self.store(&abs, head);
        head
    }

    fn reserve(&mut self, n: u16) -> u16 {
        if self.next_desc + n > QSIZE {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        self.next_desc += n;
        head
    }

    fn store(&mut self, descs: &[(u64, u32, u16, u16)], head: u16) {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, f, n)| RawDescriptor::from(SplitDescriptor::new(a, l, f, n)))
            .collect();
        // add_desc_chains makes a new avail entry after each descriptor without NEXT, so a
        // chain that ends in NEXT (a loop) stays one entry.
        self.mock.add_desc_chains(&raw, head).unwrap();
    }

    /// New used-ring entries: (head, len).
    pub(crate) fn used(&mut self) -> Vec<(u16, u32)> {
        let base = self.mock.used_addr();
        let idx: u16 = self.mem.read_obj(base.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % QSIZE);
            let elem = base.unchecked_add(4 + 8 * slot);
            let id: u32 = self.mem.read_obj(elem).unwrap();
            let len: u32 = self.mem.read_obj(elem.unchecked_add(4)).unwrap();
            out.push((u16::try_from(id).unwrap(), len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    pub(crate) fn queue(&self) -> Queue {
        self.mock.create_queue::<Queue>().unwrap()
    }
}

impl GuestQueue<'_> {
    /// The queue with chain `head` offered five times and its used ring laid over its avail
    /// ring, next_used ahead of next_avail (a restored state can say so): every used entry
    /// makes a new available one naming `head` again, so the ring never runs dry.
    pub(crate) fn self_refilling(&self, head: u16) -> Queue {
        use virtio_queue::QueueT;
        let avail = self.mock.avail_addr();
        for slot in 0..5u64 {
            self.mem
                .write_obj(head, avail.unchecked_add(4 + 2 * slot))
                .unwrap();
        }
        self.mem.write_obj(5u16, avail.unchecked_add(2)).unwrap();
        let mut queue = self.queue();
        queue.set_used_ring_address(Some(u32::try_from(avail.0).unwrap()), Some(0));
        queue.set_next_used(5);
        queue
    }
}

/// Runs `drain` (a device serving a [`GuestQueue::self_refilling`] queue, returning the
/// queue's next_avail after) on its own thread, and checks that it came back after exactly
/// `budget` chains and kicked its queue eventfd (`kicked`) to come back later.
pub(crate) fn assert_drain_yields(
    budget: usize,
    kicked: &vmm_sys_util::eventfd::EventFd,
    drain: impl FnOnce() -> Option<u16> + Send + 'static,
) {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(drain());
    });
    let next_avail = result
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("still serving a self-refilling ring after 20 s");
    assert_eq!(next_avail.map(usize::from), Some(budget));
    assert_eq!(
        kicked.read().unwrap(),
        1,
        "the queue was not kicked to come back"
    );
}
