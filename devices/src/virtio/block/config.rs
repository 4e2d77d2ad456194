//! The config space (virtio 1.2, 5.2.4) and the GET_ID serial.
//!
//! Only the fields of the offered features are filled in: `capacity`, `size_max`, `seg_max`, `blk_size`
//! and, on writable disks, the three discard fields. The layout runs up to the padding after
//! `write_zeroes_may_unmap` (60 bytes); everything past it reads as zero.

use super::device::Block;
use super::{
    BLK_SIZE, DISCARD_SECTOR_ALIGNMENT, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SEG_MAX, SERIAL_LEN,
    SIZE_MAX,
};

/// Length of the config space we fill in.
pub(crate) const CONFIG_LEN: usize = 60;
/// Offsets of the fields in `struct virtio_blk_config`.
const CAPACITY: usize = 0;
const SIZE_MAX_AT: usize = 8;
const SEG_MAX_AT: usize = 12;
const BLK_SIZE_AT: usize = 20;
const MAX_DISCARD_SECTORS_AT: usize = 36;
const MAX_DISCARD_SEG_AT: usize = 40;
const DISCARD_SECTOR_ALIGNMENT_AT: usize = 44;

impl Block {
    /// A serial that names the file at `path` on this host: its device and inode numbers in
    /// hex (stable across restarts, distinct between files), at most 20 bytes.
    pub fn default_serial(path: &std::path::Path) -> String {
        use std::os::unix::fs::MetadataExt;
        let id = std::fs::metadata(path).map_or((0, 0), |m| (m.dev(), m.ino()));
        let mut s = format!("{:x}-{:x}", id.0, id.1);
        s.truncate(SERIAL_LEN);
        s
    }

    /// The config space (`struct virtio_blk_config` up to `max_write_zeroes_seg`).
    pub(crate) fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |at: usize, b: &[u8]| c[at..at + b.len()].copy_from_slice(b);
        put(CAPACITY, &self.capacity().to_le_bytes());
        put(SIZE_MAX_AT, &SIZE_MAX.to_le_bytes());
        put(SEG_MAX_AT, &SEG_MAX.to_le_bytes());
        put(BLK_SIZE_AT, &BLK_SIZE.to_le_bytes());
        if !self.is_read_only() {
            put(MAX_DISCARD_SECTORS_AT, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(MAX_DISCARD_SEG_AT, &MAX_DISCARD_SEG.to_le_bytes());
            put(
                DISCARD_SECTOR_ALIGNMENT_AT,
                &DISCARD_SECTOR_ALIGNMENT.to_le_bytes(),
            );
        }
        c
    }
}
