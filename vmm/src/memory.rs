//! Guest memory: one memfd, mapped shared, split around the 32-bit MMIO gap.
//!
//! A memfd (not anonymous memory) backs the guest so that a snapshot can write it out as a
//! file and a restore can map such a file in its place: the layout of regions over file
//! offsets is the same either way.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Guest memory as the rest of the VMM sees it: the devices' type, whose per-region dirty
/// bitmap records what the VMM and its devices write into the guest.
pub type GuestMemory = kiln_devices::virtio::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest memory file (memfd_create): {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest memory file to {size} bytes: {source}")]
    Truncate { size: u64, source: std::io::Error },
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

/// Creates `size` bytes of zeroed guest memory backed by a new memfd.
pub fn create(size: u64) -> Result<(GuestMemory, File), MemoryError> {
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(MemoryError::Unaligned(size));
    }
    // SAFETY: the name is a valid NUL-terminated string; the call has no other
    // preconditions, and the result is checked below.
    let fd = unsafe { libc::memfd_create(c"kiln-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Truncate { size, source })?;
    let memory = map_file(&file, size)?;
    Ok((memory, file))
}

/// Maps `file` (holding `size` bytes of guest RAM) shared, as the guest's memory.
pub fn map_file(file: &File, size: u64) -> Result<GuestMemory, MemoryError> {
    let mut regions = Vec::new();
    for (addr, len, offset) in ram_ranges(size) {
        let map_err = |source| MemoryError::Map { size: len, source };
        let file = file.try_clone().map_err(MemoryError::Memfd)?;
        let len_usize = usize::try_from(len).map_err(|_| MemoryError::Unaligned(len))?;
        let region =
            MmapRegion::from_file(FileOffset::new(file, offset), len_usize).map_err(map_err)?;
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
    fn memory_is_backed_by_the_file() {
        use std::os::unix::fs::FileExt;
        let (mem, file) = create(2 << 20).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        file.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(mem.last_addr(), GuestAddress((2 << 20) - 1));
        assert!(matches!(create(1000), Err(MemoryError::Unaligned(1000))));
    }
}
