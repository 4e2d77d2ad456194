//! A copy-on-write disk: a shared base image, read-only, under a per-VM sparse overlay file.
//!
//! The overlay file has the base's size and the same layout (byte `n` of the disk is byte `n`
//! of whichever file holds it). An in-memory bitmap says, per [`CLUSTER_SIZE`] cluster,
//! whether the cluster lives in the overlay; reads take each cluster from the overlay or the
//! base, writes always go to the overlay. The base is opened `O_RDONLY` and never written.
//!
//! Why 4 KiB clusters: guests write in 4 KiB units (page cache, ext4 and xfs blocks), so
//! almost every write covers whole clusters and goes straight to the overlay with no
//! read-modify-write, and the overlay grows by what the guest wrote, not by a 64 KiB
//! cluster per 4 KiB write (qcow2's default trades that for smaller metadata). The bitmap
//! costs 32 KiB per GiB of disk, small enough to live in memory and in every snapshot. A
//! write that covers only part of a cluster that is not yet in the overlay first copies the
//! base cluster into it (read-modify-write).
//!
//! Discard: a discarded region must read back as zeros, never as the base's data (the guest
//! may rely on that after a discard, e.g. with `discard_zeroes_data`-style assumptions, and
//! leaking old base data back would be surprising). Whole clusters are punched out of the
//! overlay (sparse again) and marked as present, so they read as the overlay's zeros;
//! partial clusters are zero-filled through the ordinary copy-on-write path.
//!
//! The bitmap is the only metadata and it is not written to disk: an overlay outlives its
//! device only through [`Overlay::bitmap`] in a snapshot ([`super::BlockState`]), and
//! [`Overlay::reopen`] puts it back. The overlay file in a snapshot must be copied (e.g.
//! `cp --sparse=always` or a reflink) while the VM is paused, after a flush, so that file and
//! bitmap agree.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::disk::{file_len, open_file, zero_range, Disk};
use super::BlockError;

/// The copy-on-write unit, in bytes.
pub const CLUSTER_SIZE: u64 = CS as u64;
const CS: usize = 4096;

/// An offset relative to the start of a buffer or cluster the caller holds, as an index.
#[allow(clippy::cast_possible_truncation)] // it is at most that buffer's length, a usize
fn at(rel: u64) -> usize {
    rel as usize
}

/// A copy-on-write disk (see the module documentation).
#[derive(Debug)]
pub struct Overlay {
    base: File,
    base_path: PathBuf,
    overlay: File,
    overlay_path: PathBuf,
    len: u64,
    /// Bit `c % 64` of word `c / 64`: cluster `c` lives in the overlay.
    bitmap: Vec<u64>,
}

/// The largest base an overlay takes: 1 TiB, a 32 MiB bitmap. The bitmap lives in memory
/// and in every snapshot, so a larger disk wants larger clusters or on-disk metadata.
pub const MAX_OVERLAY_LEN: u64 = 1 << 40;

fn bitmap_words(len: u64) -> usize {
    // At most MAX_OVERLAY_LEN / 4096 / 64 = 2^22 words once `check_len` passed.
    usize::try_from(len.div_ceil(CLUSTER_SIZE).div_ceil(64)).unwrap_or(usize::MAX)
}

fn check_len(len: u64, overlay: &Path) -> Result<(), BlockError> {
    if len > MAX_OVERLAY_LEN {
        return Err(BlockError::OverlayMismatch {
            path: overlay.to_path_buf(),
            reason: format!("the base has {len} bytes; overlays take at most {MAX_OVERLAY_LEN}"),
        });
    }
    Ok(())
}

impl Overlay {
    /// A new, empty overlay at `overlay` (which must not exist yet) over the image `base`.
    pub fn create(
        base: impl Into<PathBuf>,
        overlay: impl Into<PathBuf>,
    ) -> Result<Self, BlockError> {
        let (base_path, overlay_path) = (base.into(), overlay.into());
        let base = open_file(&base_path, false)?;
        let len = file_len(&base, &base_path)?;
        check_len(len, &overlay_path)?;
        let open_err = |source| BlockError::Open {
            path: overlay_path.clone(),
            source,
        };
        // Guest disk contents: private to this user, never through a planted link.
        let overlay = crate::private::create_file(&overlay_path).map_err(open_err)?;
        overlay.set_len(len).map_err(open_err)?;
        Ok(Self {
            base,
            base_path,
            overlay,
            overlay_path,
            len,
            bitmap: vec![0; bitmap_words(len)],
        })
    }

    /// An existing overlay and the bitmap saved with it (from [`Overlay::bitmap`]).
    pub fn reopen(
        base: impl Into<PathBuf>,
        overlay: impl Into<PathBuf>,
        bitmap: Vec<u64>,
    ) -> Result<Self, BlockError> {
        let (base_path, overlay_path) = (base.into(), overlay.into());
        let base = open_file(&base_path, false)?;
        let len = file_len(&base, &base_path)?;
        check_len(len, &overlay_path)?;
        let file = open_file(&overlay_path, true)?;
        let overlay_len = file_len(&file, &overlay_path)?;
        let mismatch = |reason: String| BlockError::OverlayMismatch {
            path: overlay_path.clone(),
            reason,
        };
        if overlay_len != len {
            return Err(mismatch(format!("{overlay_len} bytes, base has {len}")));
        }
        if bitmap.len() != bitmap_words(len) {
            return Err(mismatch(format!(
                "bitmap has {} words, a {len}-byte disk needs {}",
                bitmap.len(),
                bitmap_words(len)
            )));
        }
        let clusters = len.div_ceil(CLUSTER_SIZE);
        if clusters % 64 != 0 && bitmap.last().is_some_and(|w| w >> (clusters % 64) != 0) {
            return Err(mismatch("bitmap marks clusters past the end".into()));
        }
        Ok(Self {
            base,
            base_path,
            overlay: file,
            overlay_path,
            len,
            bitmap,
        })
    }

    /// The cluster bitmap (bit set: the cluster lives in the overlay), for a snapshot.
    pub fn bitmap(&self) -> &[u64] {
        &self.bitmap
    }

    /// The shared base image.
    pub fn base_path(&self) -> &Path {
        &self.base_path
    }

    /// The per-VM overlay file.
    pub fn overlay_path(&self) -> &Path {
        &self.overlay_path
    }

    fn present(&self, cluster: u64) -> bool {
        let word = usize::try_from(cluster / 64).ok();
        word.and_then(|w| self.bitmap.get(w))
            .is_some_and(|w| w & (1 << (cluster % 64)) != 0)
    }

    fn mark(&mut self, clusters: std::ops::Range<u64>) {
        for c in clusters {
            if let Some(w) = usize::try_from(c / 64)
                .ok()
                .and_then(|w| self.bitmap.get_mut(w))
            {
                *w |= 1 << (c % 64);
            }
        }
    }

    /// The end of cluster `c`, clipped to the disk (the last cluster may be short).
    fn cluster_end(&self, c: u64) -> u64 {
        c.saturating_add(1)
            .saturating_mul(CLUSTER_SIZE)
            .min(self.len)
    }

    /// Whether the write `pos..end` can go straight to the overlay for cluster `c` (which
    /// contains `pos`): the cluster is there already, or the write covers all of it.
    fn direct(&self, c: u64, pos: u64, end: u64) -> bool {
        self.present(c) || (pos == c * CLUSTER_SIZE && end >= self.cluster_end(c))
    }
}

impl Disk for Overlay {
    fn len(&self) -> u64 {
        self.len
    }

    fn is_read_only(&self) -> bool {
        false
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            // The longest run of clusters that all come from the same file.
            let in_overlay = self.present(pos / CLUSTER_SIZE);
            let mut run_end = self.cluster_end(pos / CLUSTER_SIZE).min(end);
            while run_end < end && self.present(run_end / CLUSTER_SIZE) == in_overlay {
                run_end = self.cluster_end(run_end / CLUSTER_SIZE).min(end);
            }
            let file = if in_overlay {
                &self.overlay
            } else {
                &self.base
            };
            // Both offsets lie within `buf`, whose length is a usize.
            let piece = &mut buf[at(pos - offset)..at(run_end - offset)];
            file.read_exact_at(piece, pos)?;
            pos = run_end;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        let mut cluster = [0u8; CS];
        while pos < end {
            let first = pos / CLUSTER_SIZE;
            if self.direct(first, pos, end) {
                let mut run_end = self.cluster_end(first).min(end);
                while run_end < end && self.direct(run_end / CLUSTER_SIZE, run_end, end) {
                    run_end = self.cluster_end(run_end / CLUSTER_SIZE).min(end);
                }
                let piece = &buf[at(pos - offset)..at(run_end - offset)];
                self.overlay.write_all_at(piece, pos)?;
                // Only clusters the overlay now holds entirely (or held already).
                self.mark(first..run_end.div_ceil(CLUSTER_SIZE));
                pos = run_end;
            } else {
                // Read-modify-write: the base cluster with the new bytes on top.
                let cstart = first * CLUSTER_SIZE;
                let cend = self.cluster_end(first);
                let wend = cend.min(end);
                let whole = &mut cluster[..at(cend - cstart)];
                self.base.read_exact_at(whole, cstart)?;
                whole[at(pos - cstart)..at(wend - cstart)]
                    .copy_from_slice(&buf[at(pos - offset)..at(wend - offset)]);
                self.overlay.write_all_at(whole, cstart)?;
                self.mark(first..first + 1);
                pos = wend;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.overlay.sync_data()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let mut pos = offset;
        let zeros = [0u8; CS];
        while pos < end {
            let first = pos / CLUSTER_SIZE;
            let whole =
                |o: &Self, c: u64, at: u64| at == c * CLUSTER_SIZE && end >= o.cluster_end(c);
            if whole(self, first, pos) {
                let mut run_end = self.cluster_end(first);
                while run_end < end && whole(self, run_end / CLUSTER_SIZE, run_end) {
                    run_end = self.cluster_end(run_end / CLUSTER_SIZE);
                }
                zero_range(&self.overlay, pos, run_end - pos)?;
                self.mark(first..run_end.div_ceil(CLUSTER_SIZE));
                pos = run_end;
            } else {
                let wend = self.cluster_end(first).min(end);
                self.write_at(&zeros[..at(wend - pos)], pos)?;
                pos = wend;
            }
        }
        Ok(())
    }
}
