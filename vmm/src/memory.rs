//! Guest memory: anonymous private memory, split around the 32-bit MMIO gap.
//!
//! A new VM's RAM is anonymous memory, as Firecracker's is: the guest's first touch of a
//! page is an anonymous page fault, cheaper than a shared-memory (memfd) fault, which made
//! whole boots measurably slower in the nested test bed. A snapshot writes the RAM out
//! through the mapping; a restore maps the snapshot's file in its place
//! (`snapshot::memory`), region by region at the file offsets [`ram_ranges`] gives.

use vm_memory::{GuestAddress, GuestRegionMmap};

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Guest memory as the rest of the VMM sees it: the devices' type, whose per-region dirty
/// bitmap records what the VMM and its devices write into the guest.
pub type GuestMemory = kiln_devices::virtio::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        size: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest memory regions overlap or are invalid: {0}")]
    Regions(#[from] vm_memory::GuestRegionCollectionError),
    #[error("guest memory size {0} is not a multiple of the page size")]
    Unaligned(u64),
}

/// The guest-physical ranges RAM of `size` bytes occupies, each with its offset in the
/// backing file: below the MMIO gap first, the rest from 4 GiB up.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low, 0)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), size - low, low));
    }
    ranges
}

/// Creates `size` bytes of zeroed guest memory.
pub fn create(size: u64) -> Result<GuestMemory, MemoryError> {
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(MemoryError::Unaligned(size));
    }
    let mut regions = Vec::new();
    for (addr, len, _offset) in ram_ranges(size) {
        let len_usize = usize::try_from(len).map_err(|_| MemoryError::Unaligned(len))?;
        // MAP_NORESERVE: the guest's RAM is committed page by page as it touches it.
        let region = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(
            len_usize,
            vm_memory::bitmap::NewBitmap::with_len(len_usize),
        )
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        .build()
        .map_err(|source| MemoryError::Map { size: len, source })?;
        regions.push(GuestRegionMmap::new(region, addr).ok_or(MemoryError::Unaligned(len))?);
    }
    Ok(GuestMemory::from_regions(regions)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20, 0)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START, 0));
        assert_eq!(
            r[1],
            (
                GuestAddress(MMIO_GAP_END),
                (4 << 30) - MMIO_GAP_START,
                MMIO_GAP_START
            )
        );
    }

    #[test]
    fn memory_is_zeroed_writable_and_page_aligned() {
        let mem = create(2 << 20).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0);
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(mem.last_addr(), GuestAddress((2 << 20) - 1));
        assert!(matches!(create(1000), Err(MemoryError::Unaligned(1000))));
        assert!(matches!(create(0), Err(MemoryError::Unaligned(0))));
    }
}
