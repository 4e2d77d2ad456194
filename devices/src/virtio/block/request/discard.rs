//! DISCARD (virtio 1.2, 5.2.6): the data is an array of 16-byte segments
//! (`le64 sector, le32 num_sectors, le32 flags`). Every segment is checked (range, size, no
//! flags: the unmap flag belongs to WRITE_ZEROES) before any is applied, so a bad request
//! discards nothing.

use vm_memory::Bytes;

use super::{check_data, disk_range, ioerr, Failure, Piece};
use crate::virtio::block::disk::Disk;
use crate::virtio::block::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SIZE};
use crate::virtio::GuestMemory;

/// Size of one discard segment.
const DISCARD_SEG_LEN: usize = 16;

/// DISCARD: every segment is checked before any is applied.
pub(super) fn discard(
    mem: &GuestMemory,
    data: &[Piece],
    disk: &mut dyn Disk,
) -> Result<(), Failure> {
    let total = check_data(mem, data, false)?;
    let segs = total / DISCARD_SEG_LEN as u64;
    if total % DISCARD_SEG_LEN as u64 != 0 || segs == 0 || segs > u64::from(MAX_DISCARD_SEG) {
        return Err(ioerr(format!("discard data of {total} bytes")));
    }
    // At most MAX_DISCARD_SEG * 16 bytes.
    let mut raw = Vec::with_capacity(MAX_DISCARD_SEG as usize * DISCARD_SEG_LEN);
    for d in data {
        let start = raw.len();
        raw.resize(start + d.len as usize, 0);
        mem.read_slice(&mut raw[start..], d.addr)
            .map_err(|e| ioerr(e.to_string()))?;
    }
    let mut ranges = Vec::new();
    for seg in raw.chunks_exact(DISCARD_SEG_LEN) {
        let le32 = |at: usize| u32::from_le_bytes([seg[at], seg[at + 1], seg[at + 2], seg[at + 3]]);
        let sector = u64::from(le32(0)) | u64::from(le32(4)) << 32;
        let (num, flags) = (le32(8), le32(12));
        if flags != 0 {
            // The unmap flag belongs to WRITE_ZEROES; unknown flags are unsupported too.
            return Err(Failure::Unsupp(format!("discard flags {flags:#x}")));
        }
        if num > MAX_DISCARD_SECTORS {
            return Err(ioerr(format!("discard of {num} sectors")));
        }
        let len = u64::from(num) * SECTOR_SIZE;
        ranges.push((disk_range(disk, sector, len)?, len));
    }
    for (offset, len) in ranges {
        disk.discard(offset, len)
            .map_err(|e| ioerr(format!("discard at {offset}: {e}")))?;
    }
    Ok(())
}
