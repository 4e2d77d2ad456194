//! Moving packets through the three queues.
//!
//! The queues are the guest's: every chain is parsed with `virtio-vsock`'s `VsockPacket`,
//! which checks descriptor directions and lengths against guest memory. A chain that does
//! not parse is returned to the guest as used with length 0 and logged; it never reaches
//! the connection logic.
//!
//! `VsockPacket` takes a tx payload from one descriptor only, but a driver may split it over
//! several: Linux 6.12 sends payloads over ~32 KiB as one descriptor per skb fragment. Such
//! chains are checked the same way and their payload is gathered into a buffer
//! ([`gather_tx`]). Every tx packet is handled as such a copy ([`TxPkt`]), so that the
//! connection logic sees one type whichever shape the chain had; rx packets ([`RxPkt`]) are
//! written in place, through guest memory's dirty bitmap.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{Error as PacketError, VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, Bytes, GuestMemoryError};

use super::{MAX_PKT_DATA, QUEUE_SIZE, TYPE_STREAM};
use crate::virtio::queue_ops::{add_used, drain, notify};
use crate::virtio::{GuestMemory, VirtioInterrupt};
use vmm_sys_util::eventfd::EventFd;

/// A packet from the guest, copied out of guest memory.
pub(crate) type TxPkt<'a> = VsockPacket<'a, ()>;
/// A packet to the guest, in an rx buffer in guest memory (writes mark the pages dirty).
pub(crate) type RxPkt<'a> = VsockPacket<'a, vm_memory::bitmap::BS<'a, AtomicBitmap>>;

/// Size of the header in front of every packet.
pub(crate) const HDR_LEN: u32 = 44;
const _: () = assert!(PKT_HEADER_SIZE == HDR_LEN as usize);

/// The header of a packet the device sends to the guest (type is always stream).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) src_cid: u64,
    pub(crate) dst_cid: u64,
    pub(crate) src_port: u32,
    pub(crate) dst_port: u32,
    pub(crate) op: u16,
    pub(crate) flags: u32,
    pub(crate) buf_alloc: u32,
    pub(crate) fwd_cnt: u32,
}

impl Header {
    /// Write this header, with payload length `len`, into `pkt`.
    pub(crate) fn write_to(&self, pkt: &mut RxPkt<'_>, len: u32) {
        pkt.set_src_cid(self.src_cid)
            .set_dst_cid(self.dst_cid)
            .set_src_port(self.src_port)
            .set_dst_port(self.dst_port)
            .set_len(len)
            .set_type(TYPE_STREAM)
            .set_op(self.op)
            .set_flags(self.flags)
            .set_buf_alloc(self.buf_alloc)
            .set_fwd_cnt(self.fwd_cnt);
    }
}

/// The most chains one call takes from a queue. A ring that refills as fast as it is
/// drained (a vCPU that keeps adding chains, or a used ring laid over the avail ring so that
/// each used entry makes a new available one) must not hold the event loop forever: the
/// caller kicks the queue's eventfd itself and carries on after the other events.
pub(crate) const CHAIN_BUDGET: usize = 2 * QUEUE_SIZE as usize;

/// Pop every available tx chain (at most [`CHAIN_BUDGET`]; past it the queue's eventfd
/// `evt` is kicked, for the event loop to come back after its other events) and hand each
/// packet that parses to `handle`.
pub(crate) fn drain_tx(
    queue: &mut Queue,
    mem: &GuestMemory,
    evt: &EventFd,
    irq: &VirtioInterrupt,
    mut handle: impl FnMut(&TxPkt<'_>),
) {
    if irq.queue_unusable(queue, mem, "vsock tx") {
        return;
    }
    let mut scratch = TxScratch::default();
    drain(queue, mem, evt, (irq, "vsock tx"), CHAIN_BUDGET, |chain| {
        let head = chain.head_index();
        let parsed = match VsockPacket::from_tx_virtq_chain(mem, &mut chain.clone(), MAX_PKT_DATA) {
            Ok(pkt) => Ok(copy_tx(&pkt, &mut scratch)),
            // Not the one-payload-descriptor shape: maybe a split payload.
            Err(_) => gather_tx(mem, chain, &mut scratch),
        };
        match parsed {
            Ok(pkt) => handle(&pkt),
            Err(e) => crate::guest_warn!(static, head, "vsock: dropping malformed tx chain: {e}"),
        }
        (0, 1)
    });
}

/// Where [`gather_tx`] copies a packet whose payload spans several descriptors.
struct TxScratch {
    header: [u8; PKT_HEADER_SIZE],
    data: Vec<u8>,
}

impl Default for TxScratch {
    fn default() -> Self {
        TxScratch {
            header: [0; PKT_HEADER_SIZE],
            data: Vec::new(),
        }
    }
}

/// Parses a tx chain whose payload may be split over several descriptors: the header in
/// the head descriptor, the payload in what follows it there and in the next descriptors,
/// in order. Every descriptor must be device-readable and inside guest memory; the payload
/// must be at most [`MAX_PKT_DATA`] bytes and the chain must hold all of it. The packet is
/// a copy in `scratch`.
fn gather_tx<'s>(
    mem: &GuestMemory,
    mut chain: DescriptorChain<&GuestMemory>,
    scratch: &'s mut TxScratch,
) -> Result<TxPkt<'s>, PacketError> {
    let head = chain.next().ok_or(PacketError::DescriptorChainTooShort)?;
    if head.is_write_only() {
        return Err(PacketError::UnexpectedWriteOnlyDescriptor);
    }
    if (head.len() as usize) < PKT_HEADER_SIZE {
        return Err(PacketError::DescriptorLengthTooSmall);
    }
    mem.read_slice(&mut scratch.header, head.addr())
        .map_err(PacketError::InvalidMemoryAccess)?;
    // `len` is the little-endian u32 at offset 24 of the header.
    let mut len_bytes = [0u8; 4];
    len_bytes.copy_from_slice(&scratch.header[24..28]);
    let len = u32::from_le_bytes(len_bytes);
    if len > MAX_PKT_DATA {
        return Err(PacketError::InvalidHeaderLen(len));
    }
    let want = len as usize;
    scratch.data.clear();
    scratch.data.resize(want, 0);
    let rest_of_head = head
        .addr()
        .checked_add(HDR_LEN.into())
        .map(|addr| (addr, head.len() - HDR_LEN));
    let mut filled = 0;
    let mut pieces = rest_of_head.into_iter();
    let mut next_piece = |chain: &mut DescriptorChain<&GuestMemory>| {
        if let Some(piece) = pieces.next() {
            return Ok(Some(piece));
        }
        match chain.next() {
            Some(d) if d.is_write_only() => Err(PacketError::UnexpectedWriteOnlyDescriptor),
            Some(d) => Ok(Some((d.addr(), d.len()))),
            None => Ok(None),
        }
    };
    while filled < want {
        let Some((addr, piece_len)) = next_piece(&mut chain)? else {
            return Err(PacketError::DescriptorLengthTooSmall);
        };
        let take = (piece_len as usize).min(want - filled);
        mem.read_slice(&mut scratch.data[filled..filled + take], addr)
            .map_err(PacketError::InvalidMemoryAccess)?;
        filled += take;
    }
    scratch.packet()
}

/// Copies a packet `VsockPacket` parsed in place into `scratch`.
fn copy_tx<'s, B: vm_memory::bitmap::BitmapSlice>(
    pkt: &VsockPacket<'_, B>,
    scratch: &'s mut TxScratch,
) -> TxPkt<'s> {
    pkt.header_slice().copy_to(&mut scratch.header[..]);
    scratch.data.clear();
    if let Some(data) = pkt.data_slice() {
        scratch.data.resize(data.len(), 0);
        data.copy_to(&mut scratch.data[..]);
    }
    // The header and length were checked by `from_tx_virtq_chain`, so this cannot fail.
    scratch
        .packet()
        .expect("a packet that parsed in place is valid as a copy")
}

impl TxScratch {
    /// The packet whose header and payload were copied into this scratch space.
    fn packet(&mut self) -> Result<TxPkt<'_>, PacketError> {
        let TxScratch { header, data } = self;
        let raw_header = *header;
        let data = (!data.is_empty()).then_some(&mut data[..]);
        // SAFETY: both slices borrow `self` for as long as the packet that points into them
        // lives; nothing else touches them meanwhile.
        let mut pkt = unsafe { VsockPacket::new(header, data) }?;
        pkt.set_header_from_raw(&raw_header)?;
        Ok(pkt)
    }
}

/// Fill rx chains while `fill` produces packets (`Some(payload length)`), at most
/// [`CHAIN_BUDGET`] of them. A chain `fill` has no use for is put back. Returns true if it
/// stopped on the budget while `more` still said there was work: the caller must come back.
pub(crate) fn fill_rx(
    queue: &mut Queue,
    mem: &GuestMemory,
    irq: &VirtioInterrupt,
    mut more: impl FnMut() -> bool,
    mut fill: impl FnMut(&mut RxPkt<'_>) -> Option<u32>,
) -> bool {
    if irq.queue_unusable(queue, mem, "vsock rx") {
        return false;
    }
    let mut used = false;
    let mut retried = false;
    let mut taken = 0;
    let mut out_of_budget = false;
    while more() {
        if taken >= CHAIN_BUDGET {
            out_of_budget = true;
            break;
        }
        let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
            // Ask for a kick when the guest adds buffers (matters with EVENT_IDX); retry
            // once if some arrived meanwhile, but never spin on a corrupt ring.
            match queue.enable_notification(mem) {
                Ok(true) if !retried => {
                    retried = true;
                    continue;
                }
                _ => break,
            }
        };
        let head = chain.head_index();
        let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
            Ok(mut pkt) => match fill(&mut pkt) {
                Some(n) => HDR_LEN + n,
                // A buffer without room for payload cannot carry the data that is
                // waiting; hand it back empty rather than let it block the ring.
                None if pkt.data_slice().is_none_or(|d| d.is_empty()) => {
                    crate::guest_warn!(
                        static,
                        head,
                        "vsock: rx buffer has no room for payload; returned unused"
                    );
                    0
                }
                None => {
                    queue.go_to_previous_position();
                    break;
                }
            },
            Err(e) => {
                crate::guest_warn!(static, head, "vsock: dropping malformed rx chain: {e}");
                0
            }
        };
        add_used(queue, mem, head, len, "vsock");
        used = true;
        taken += 1;
    }
    if used {
        notify(queue, mem, irq, "vsock");
    }
    out_of_budget
}

/// Put a 4-byte event (`le32 id`) into the next event-queue buffer. Returns false if the
/// guest has posted no usable buffer (among the next [`CHAIN_BUDGET`] chains).
pub(crate) fn write_event(
    queue: &mut Queue,
    mem: &GuestMemory,
    irq: &VirtioInterrupt,
    id: u32,
) -> bool {
    if irq.queue_unusable(queue, mem, "vsock event") {
        return false;
    }
    for _ in 0..CHAIN_BUDGET {
        let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
            let _ = queue.enable_notification(mem);
            return false;
        };
        let head = chain.head_index();
        let target = chain
            .find(|d| d.is_write_only() && d.len() >= 4)
            .map(|d| d.addr());
        let written = match target {
            Some(addr) => mem
                .write_slice(&id.to_le_bytes(), addr)
                .map_err(|e: GuestMemoryError| e.to_string()),
            None => Err("no writable descriptor of 4 bytes".to_string()),
        };
        match written {
            Ok(()) => {
                add_used(queue, mem, head, 4, "vsock");
                notify(queue, mem, irq, "vsock");
                return true;
            }
            Err(e) => {
                crate::guest_warn!(static, head, "vsock: dropping malformed event chain: {e}");
                add_used(queue, mem, head, 0, "vsock");
            }
        }
    }
    crate::guest_warn!(
        static,
        "vsock: event ring keeps yielding unusable chains; waiting for the next kick"
    );
    false
}
