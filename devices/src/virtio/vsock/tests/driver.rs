//! The guest driver's side of the queues: descriptor chains in, used entries out.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};

use vm_memory::{Bytes, GuestAddress};

use super::GUEST_CID;
use crate::virtio::test_queue;
pub(crate) use crate::virtio::test_queue::QSIZE;
use crate::virtio::vsock::HOST_CID;
use crate::virtio::GuestMemory;

/// A guest packet header, as the guest driver writes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    /// `None`: the payload's length.
    pub len: Option<u32>,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    /// A packet from guest port `src` to host port `dst`, with 64 KiB of guest credit.
    pub(crate) fn new(op: u16, src_port: u32, dst_port: u32) -> Self {
        Self {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: None,
            type_: 1,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    pub(crate) fn encode(&self, payload_len: u32) -> [u8; 44] {
        let mut b = [0u8; 44];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.unwrap_or(payload_len).to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A packet the device put into an rx buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RxPkt {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
    pub data: Vec<u8>,
    pub used_len: u32,
}

fn le<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    b[at..at + N].try_into().unwrap()
}

/// One virtqueue as the guest driver sees it: the shared test queue, plus where each chain's
/// first buffer is, so that a used rx entry can be decoded as a packet.
///
/// Everything but `add_chain` and `used` (buffers, the mock rings, the device's `Queue`) is
/// the shared queue's, reached through `Deref`.
pub(crate) struct GuestQueue<'m> {
    inner: test_queue::GuestQueue<'m>,
    /// Head index → address of the chain's first buffer.
    heads: HashMap<u16, u64>,
}

impl<'m> GuestQueue<'m> {
    pub(crate) fn new(mem: &'m GuestMemory, ring: u64, buf_base: u64, buf_len: u64) -> Self {
        Self {
            inner: test_queue::GuestQueue::new(mem, ring, buf_base, buf_len),
            heads: HashMap::new(),
        }
    }

    /// Make `(addr, len, device_writable)` descriptors one available chain.
    pub(crate) fn add_chain(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.inner.add_chain(descs);
        self.heads.insert(head, descs.first().map_or(0, |d| d.0));
        head
    }

    /// New used-ring entries: (head, len, address of the chain's first buffer).
    pub(crate) fn used(&mut self) -> Vec<(u16, u32, u64)> {
        self.inner
            .used()
            .into_iter()
            .map(|(head, len)| (head, len, self.heads.get(&head).copied().unwrap_or(0)))
            .collect()
    }
}

impl<'m> Deref for GuestQueue<'m> {
    type Target = test_queue::GuestQueue<'m>;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl DerefMut for GuestQueue<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

impl RxPkt {
    /// Decode the packet at `addr` that the device used with `used_len` bytes.
    pub(crate) fn read(mem: &GuestMemory, addr: u64, used_len: u32) -> Self {
        let mut p = RxPkt {
            src_cid: 0,
            dst_cid: 0,
            src_port: 0,
            dst_port: 0,
            len: 0,
            type_: 0,
            op: 0,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
            data: Vec::new(),
            used_len,
        };
        if used_len == 0 {
            return p;
        }
        let mut b = [0u8; 44];
        mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        p.len = u32::from_le_bytes(le(&b, 24));
        p.data = vec![0u8; p.len as usize];
        mem.read_slice(&mut p.data, GuestAddress(addr + 44))
            .unwrap();
        p.src_cid = u64::from_le_bytes(le(&b, 0));
        p.dst_cid = u64::from_le_bytes(le(&b, 8));
        p.src_port = u32::from_le_bytes(le(&b, 16));
        p.dst_port = u32::from_le_bytes(le(&b, 20));
        p.type_ = u16::from_le_bytes(le(&b, 28));
        p.op = u16::from_le_bytes(le(&b, 30));
        p.flags = u32::from_le_bytes(le(&b, 32));
        p.buf_alloc = u32::from_le_bytes(le(&b, 36));
        p.fwd_cnt = u32::from_le_bytes(le(&b, 40));
        p
    }
}
