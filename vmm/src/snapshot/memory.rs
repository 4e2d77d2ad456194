//! Guest memory in a snapshot: written sparsely, mapped back copy-on-write.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::{FileOffset, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use super::SnapshotError;
use crate::memory::{ram_ranges, GuestMemory};

const PAGE: usize = 4096;
/// Copy in chunks of this size; zero pages inside a chunk are skipped.
const CHUNK: usize = 1 << 20;

/// Copies `size` bytes of guest RAM from `ram` (the memfd) to `path`, leaving zero pages as
/// holes, so a guest that touched little memory makes a small file. Returns the bytes
/// written.
pub fn write_sparse(ram: &File, size: u64, path: &Path) -> Result<u64, SnapshotError> {
    let io = |what| {
        move |source| SnapshotError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    };
    let out = File::create(path).map_err(io("create"))?;
    out.set_len(size).map_err(io("size"))?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    let mut offset = 0u64;
    while offset < size {
        let len = usize::try_from((size - offset).min(CHUNK as u64)).unwrap_or(CHUNK);
        ram.read_exact_at(&mut buf[..len], offset)
            .map_err(io("read guest memory for"))?;
        for (i, page) in buf[..len].chunks(PAGE).enumerate() {
            if page.iter().any(|&b| b != 0) {
                out.write_all_at(page, offset + (i * PAGE) as u64)
                    .map_err(io("write"))?;
                written += page.len() as u64;
            }
        }
        offset += len as u64;
    }
    out.sync_all().map_err(io("sync"))?;
    Ok(written)
}

/// Maps a snapshot's memory file as the guest's RAM, private: the guest's writes go to
/// anonymous copies of the pages it writes, never to the file, and every clone shares the
/// pages it only reads through the page cache.
pub fn map_private(file: &File, size: u64) -> Result<GuestMemory, String> {
    let mut regions = Vec::new();
    for (addr, len, offset) in ram_ranges(size) {
        let len = usize::try_from(len).map_err(|e| e.to_string())?;
        let clone = file.try_clone().map_err(|e| e.to_string())?;
        let region = vm_memory::mmap::MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(clone, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| format!("cannot map guest memory: {e}"))?;
        let _: &MmapRegion = &region;
        regions.push(GuestRegionMmap::new(region, addr).ok_or("bad guest memory region")?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn zero_pages_stay_holes_and_private_maps_do_not_write_back() {
        let size = 8u64 << 20;
        let (mem, ram) = crate::memory::create(size).unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress(0x5000)).unwrap();
        mem.write_obj(0x5566_7788u32, GuestAddress(0x70_0000))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("kiln-snapmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        assert_eq!(write_sparse(&ram, size, &path).unwrap(), 2 * PAGE as u64);
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
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
