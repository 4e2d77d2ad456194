//! Copying one frame between a guest descriptor chain and a host buffer.
//!
//! Both directions check every descriptor before trusting it: its direction, that it lies in
//! guest memory, and that lengths add up to at most [`MAX_FRAME_LEN`]. A chain that fails is
//! reported as a [`FrameError`]; the caller returns it to the guest with used length 0.
//! Loops cannot run forever: virtio-queue's chain iterator stops after as many descriptors
//! as the queue has.

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryError};

use super::{MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::virtio::GuestMemory;

type Chain<'a> = DescriptorChain<&'a GuestMemory>;

/// Why a chain could not carry a frame.
#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum FrameError {
    #[error("a tx chain has a device-writable descriptor")]
    WriteOnlyInTx,
    #[error("an rx chain has a device-readable descriptor")]
    ReadOnlyInRx,
    #[error("a tx frame is longer than {MAX_FRAME_LEN} bytes")]
    TooLong,
    #[error("a tx chain is shorter than the {VNET_HDR_LEN}-byte header")]
    NoHeader,
    #[error("an rx chain of {room} bytes cannot hold a {len}-byte frame")]
    NoRoom { room: usize, len: usize },
    #[error("a descriptor lies outside guest memory: {0}")]
    Memory(String),
}

fn memory(e: GuestMemoryError) -> FrameError {
    FrameError::Memory(e.to_string())
}

/// Gather a tx chain (header and frame, all device-readable) into `buf`. Returns the length.
pub(crate) fn read_chain(
    mem: &GuestMemory,
    chain: Chain<'_>,
    buf: &mut Vec<u8>,
) -> Result<usize, FrameError> {
    buf.clear();
    for desc in chain {
        if desc.is_write_only() {
            return Err(FrameError::WriteOnlyInTx);
        }
        let len = usize::try_from(desc.len()).map_err(|_| FrameError::TooLong)?;
        let start = buf.len();
        if len > MAX_FRAME_LEN - start {
            return Err(FrameError::TooLong);
        }
        buf.resize(start + len, 0);
        mem.read_slice(&mut buf[start..], desc.addr())
            .map_err(memory)?;
    }
    if buf.len() < VNET_HDR_LEN {
        return Err(FrameError::NoHeader);
    }
    Ok(buf.len())
}

/// Scatter `frame` (header and frame) over an rx chain's device-writable descriptors.
/// Returns the number of bytes written (the used length).
pub(crate) fn write_chain(
    mem: &GuestMemory,
    chain: Chain<'_>,
    frame: &[u8],
) -> Result<u32, FrameError> {
    let mut rest = frame;
    let mut room = 0usize;
    for desc in chain {
        if !desc.is_write_only() {
            return Err(FrameError::ReadOnlyInRx);
        }
        let len = usize::try_from(desc.len()).unwrap_or(usize::MAX);
        room = room.saturating_add(len);
        let n = len.min(rest.len());
        if n > 0 {
            mem.write_slice(&rest[..n], desc.addr()).map_err(memory)?;
            rest = &rest[n..];
        }
        if rest.is_empty() {
            break;
        }
    }
    if !rest.is_empty() {
        return Err(FrameError::NoRoom {
            room,
            len: frame.len(),
        });
    }
    u32::try_from(frame.len()).map_err(|_| FrameError::TooLong)
}
