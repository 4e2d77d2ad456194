//! Guest memory in a snapshot: written sparsely, mapped back copy-on-write.
//!
//! A full snapshot's memory file holds all of guest RAM (zero pages stay holes). A diff
//! snapshot's file has the same size but holds only the pages its [`PageSet`] names; a
//! restore maps the base file and then each diff's pages over it, all `MAP_PRIVATE`, so
//! clones still share every page through the page cache and nothing is copied.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestRegionMmap, MmapRegion};

use super::pages::{PageSet, PAGE, PAGE_SIZE};
use super::SnapshotError;
use crate::memory::{ram_ranges, GuestMemory};

/// Copy in chunks of this size; zero pages inside a chunk are skipped.
const CHUNK: usize = 1 << 20;
/// More runs of diff pages than this are copied in rather than mapped, to stay far from
/// the kernel's limit on mappings per process (vm.max_map_count, 65530 by default).
const MAX_OVERLAY_MAPPINGS: usize = 8192;

/// Writes guest RAM (`size` bytes) to `path`: every non-zero page, or with `only` just
/// those pages (a zero page among them stays a hole, which reads back as zeros). Returns
/// the bytes written.
pub fn write_memory(
    memory: &GuestMemory,
    size: u64,
    only: Option<&PageSet>,
    path: &Path,
) -> Result<u64, SnapshotError> {
    let io = |what| {
        move |source| SnapshotError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    };
    // Guest RAM: a new private file (0600), never written through a planted link. The
    // caller checked that the directory holds no snapshot, so a file here is a leftover.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("remove")(e)),
        _ => {}
    }
    let out = kiln_devices::private::create_file(path).map_err(io("create"))?;
    out.set_len(size).map_err(io("size"))?;
    let extents = match only {
        Some(pages) => pages
            .runs()
            .into_iter()
            .map(|(first, count)| (first * PAGE, count * PAGE))
            .collect(),
        None => vec![(0, size)],
    };
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    for (start, len) in extents {
        for (offset, len) in split_chunks(start, len) {
            let chunk = &mut buf[..len];
            read_guest(memory, size, offset, chunk)?;
            for (i, page) in chunk.chunks(PAGE_SIZE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    out.write_all_at(page, offset + i as u64 * PAGE)
                        .map_err(io("write"))?;
                    written += page.len() as u64;
                }
            }
        }
    }
    out.sync_all().map_err(io("sync"))?;
    Ok(written)
}

/// `(offset, len)` pieces of at most [`CHUNK`] bytes covering `len` bytes from `start`.
fn split_chunks(start: u64, len: u64) -> impl Iterator<Item = (u64, usize)> {
    let end = start + len;
    (start..end).step_by(CHUNK).map(move |o| {
        (
            o,
            usize::try_from(end - o).map_or(CHUNK, |rest| rest.min(CHUNK)),
        )
    })
}

/// The guest address of byte `offset` of the memory file, and how many bytes from there
/// are contiguous in guest memory.
fn guest_addr(size: u64, offset: u64) -> Option<(GuestAddress, u64)> {
    ram_ranges(size)
        .into_iter()
        .find(|&(_, len, start)| offset >= start && offset < start + len)
        .map(|(addr, len, start)| {
            (
                GuestAddress(addr.0 + (offset - start)),
                start + len - offset,
            )
        })
}

/// Reads `buf.len()` bytes of guest RAM starting at memory-file offset `offset`.
fn read_guest(
    memory: &GuestMemory,
    size: u64,
    mut offset: u64,
    mut buf: &mut [u8],
) -> Result<(), SnapshotError> {
    while !buf.is_empty() {
        let (addr, contiguous) = guest_addr(size, offset).ok_or_else(|| {
            SnapshotError::NotSnapshottable(format!("offset {offset:#x} is outside guest RAM"))
        })?;
        let n = usize::try_from(contiguous).map_or(buf.len(), |c| c.min(buf.len()));
        let (now, rest) = buf.split_at_mut(n);
        memory.read_slice(now, addr).map_err(|e| {
            SnapshotError::NotSnapshottable(format!("cannot read guest memory: {e}"))
        })?;
        buf = rest;
        offset += n as u64;
    }
    Ok(())
}

/// Why a snapshot's memory file cannot become the guest's memory.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("a memory range does not fit this host's address space: {0}")]
    Size(#[from] std::num::TryFromIntError),
    #[error("cannot map guest memory: {0}")]
    File(std::io::Error),
    #[error("cannot map guest memory: {0}")]
    Mmap(vm_memory::mmap::MmapRegionError),
    #[error("bad guest memory region at {0:#x?}")]
    Region(GuestAddress),
    #[error("cannot map guest memory: {0}")]
    Regions(vm_memory::GuestRegionCollectionError),
    #[error("a diff page lies outside guest RAM")]
    OutsideRam,
    #[error("diff page at {addr:#x?}: {source}")]
    Host {
        addr: GuestAddress,
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot map diff pages at {addr:#x?}: {source}")]
    MapDiff {
        addr: GuestAddress,
        source: std::io::Error,
    },
    #[error("cannot read diff pages at offset {offset:#x}: {source}")]
    ReadDiff { offset: u64, source: std::io::Error },
    #[error("cannot copy diff pages to {addr:#x?}: {source}")]
    CopyDiff {
        addr: GuestAddress,
        source: vm_memory::GuestMemoryError,
    },
}

/// Maps a snapshot's memory file as the guest's RAM, private: the guest's writes go to
/// anonymous copies of the pages it writes, never to the file, and every clone shares the
/// pages it only reads through the page cache.
pub fn map_private(file: &File, size: u64) -> Result<GuestMemory, MapError> {
    let mut regions = Vec::new();
    for (addr, len, offset) in ram_ranges(size) {
        let len = usize::try_from(len)?;
        let clone = file.try_clone().map_err(MapError::File)?;
        let region: MmapRegion<AtomicBitmap> = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(
            len,
            vm_memory::bitmap::NewBitmap::with_len(len),
        )
        .with_file_offset(FileOffset::new(clone, offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(MapError::Mmap)?;
        regions.push(GuestRegionMmap::new(region, addr).ok_or(MapError::Region(addr))?);
    }
    GuestMemory::from_regions(regions).map_err(MapError::Regions)
}

/// Lays the pages `pages` of a diff snapshot's memory file over `memory` (mapped by
/// [`map_private`] from its base): each run of pages is mapped `MAP_PRIVATE | MAP_FIXED`
/// from `file` in place of the base's, or, when there are very many runs, copied in.
pub fn overlay(
    memory: &GuestMemory,
    size: u64,
    file: &File,
    pages: &PageSet,
) -> Result<(), MapError> {
    let mut pieces = Vec::new();
    for (first, count) in pages.runs() {
        let (mut offset, end) = (first * PAGE, (first + count) * PAGE);
        while offset < end {
            let (addr, contiguous) = guest_addr(size, offset).ok_or(MapError::OutsideRam)?;
            let len = contiguous.min(end - offset);
            pieces.push((offset, addr, len));
            offset += len;
        }
    }
    let map = pieces.len() <= MAX_OVERLAY_MAPPINGS;
    let mut buf = Vec::new();
    for (offset, addr, len) in pieces {
        let host = memory
            .get_host_address(addr)
            .map_err(|source| MapError::Host { addr, source })?;
        let len_usize = usize::try_from(len)?;
        if map {
            let file_offset = libc::off_t::try_from(offset)?;
            // SAFETY: `host..host+len` lies inside one region of `memory` (guest_addr keeps
            // each piece within a RAM range), a mapping this process made and still owns;
            // MAP_FIXED replaces exactly those pages with the diff file's, before any vCPU
            // or device uses the memory. Dropping the region unmaps the whole range,
            // these pages included.
            let mapped = unsafe {
                libc::mmap(
                    host.cast(),
                    len_usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    file_offset,
                )
            };
            if mapped == libc::MAP_FAILED {
                return Err(MapError::MapDiff {
                    addr,
                    source: std::io::Error::last_os_error(),
                });
            }
        } else {
            buf.resize(len_usize, 0);
            file.read_exact_at(&mut buf, offset)
                .map_err(|source| MapError::ReadDiff { offset, source })?;
            memory
                .write_slice(&buf, addr)
                .map_err(|source| MapError::CopyDiff { addr, source })?;
        }
    }
    Ok(())
}

/// Clears the VMM-side dirty bitmaps of every region (after a snapshot, or after a restore
/// wrote the memory it was built from).
pub fn reset_bitmaps(memory: &GuestMemory) {
    for region in memory.iter() {
        region.bitmap().reset();
    }
}

/// Takes (and clears) the pages the VMM and its devices wrote since the last reset, as a
/// set over the memory file's pages.
pub fn take_bitmaps(memory: &GuestMemory, size: u64, into: &mut PageSet) {
    for (region, (_, _, offset)) in memory.iter().zip(ram_ranges(size)) {
        into.add_bitmap(offset / PAGE, &region.bitmap().get_and_reset());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::scratch;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn zero_pages_stay_holes_and_private_maps_do_not_write_back() {
        let size = 8u64 << 20;
        let mem = crate::memory::create(size).unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress(0x5000)).unwrap();
        mem.write_obj(0x5566_7788u32, GuestAddress(0x70_0000))
            .unwrap();
        let dir = scratch("snapmem-full");
        let path = dir.join("memory");
        assert_eq!(write_memory(&mem, size, None, &path).unwrap(), 2 * PAGE);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), size);
        assert!(
            meta.blocks() * 512 < 64 * 1024,
            "file is sparse: {} blocks",
            meta.blocks()
        );

        let file = File::open(&path).unwrap();
        let restored = map_private(&file, size).unwrap();
        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x70_0000)).unwrap(),
            0x5566_7788
        );
        restored
            .write_obj(0xdead_beefu32, GuestAddress(0x5000))
            .unwrap();
        let mut on_disk = [0u8; 4];
        file.read_exact_at(&mut on_disk, 0x5000).unwrap();
        assert_eq!(
            u32::from_le_bytes(on_disk),
            0x1122_3344,
            "private mapping wrote back"
        );
        // A snapshot of the restored memory sees the write (it reads the mapping, not the
        // file it was restored from).
        let again = dir.join("again");
        write_memory(&restored, size, None, &again).unwrap();
        let copy = map_private(&File::open(&again).unwrap(), size).unwrap();
        assert_eq!(
            copy.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
            0xdead_beef
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_diff_holds_only_its_pages_and_layers_over_its_base() {
        let size = 4u64 << 20;
        let mem = crate::memory::create(size).unwrap();
        for page in 0..16u64 {
            mem.write_obj(0x1000_0000 + page, GuestAddress(page * PAGE))
                .unwrap();
        }
        let dir = scratch("snapmem-diff");
        let base_path = dir.join("base");
        write_memory(&mem, size, None, &base_path).unwrap();
        reset_bitmaps(&mem);

        // Change pages 3 and 9 (9 to all zeros), and write page 200 for the first time.
        mem.write_obj(0xaaaa_u64, GuestAddress(3 * PAGE)).unwrap();
        mem.write_obj(0u64, GuestAddress(9 * PAGE)).unwrap();
        mem.write_obj(0xbbbb_u64, GuestAddress(200 * PAGE)).unwrap();
        let mut dirty = PageSet::new(size);
        take_bitmaps(&mem, size, &mut dirty);
        assert_eq!(dirty.runs(), vec![(3, 1), (9, 1), (200, 1)]);
        let diff_path = dir.join("diff");
        assert_eq!(
            write_memory(&mem, size, Some(&dirty), &diff_path).unwrap(),
            2 * PAGE,
            "the zero page stays a hole"
        );

        let base = File::open(&base_path).unwrap();
        let restored = map_private(&base, size).unwrap();
        overlay(&restored, size, &File::open(&diff_path).unwrap(), &dirty).unwrap();
        let word = |page: u64| restored.read_obj::<u64>(GuestAddress(page * PAGE)).unwrap();
        assert_eq!(word(3), 0xaaaa);
        assert_eq!(word(9), 0, "a page zeroed after the base reads as zero");
        assert_eq!(word(200), 0xbbbb);
        assert_eq!(word(4), 0x1000_0004, "other pages come from the base");
        // Still private: writing the layered memory changes neither file.
        restored.write_obj(1u64, GuestAddress(3 * PAGE)).unwrap();
        let mut b = [0u8; 8];
        File::open(&diff_path)
            .unwrap()
            .read_exact_at(&mut b, 3 * PAGE)
            .unwrap();
        assert_eq!(u64::from_le_bytes(b), 0xaaaa);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
