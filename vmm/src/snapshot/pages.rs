//! A set of guest pages, as a bitmap over the memory file's 4 KiB pages: which pages a diff
//! snapshot holds.
//!
//! The bit layout is KVM's dirty-log layout (and vm-memory's `AtomicBitmap`'s): bit `i % 64`
//! of word `i / 64` is page `i`, so both sources merge with a bitwise or.

use serde::{Deserialize, Serialize};

/// The page size snapshots and the dirty log count in.
pub const PAGE_SIZE: usize = 4096;
/// [`PAGE_SIZE`] as a file or guest offset.
pub const PAGE: u64 = PAGE_SIZE as u64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageSet {
    /// How many pages the set ranges over (the guest's RAM in pages).
    pages: u64,
    bits: Vec<u64>,
}

impl PageSet {
    /// An empty set over `bytes` of guest RAM.
    pub fn new(bytes: u64) -> Self {
        let pages = bytes.div_ceil(PAGE);
        PageSet {
            pages,
            bits: vec![0; usize::try_from(pages.div_ceil(64)).unwrap_or(0)],
        }
    }

    /// The number of pages the set ranges over.
    pub fn range_pages(&self) -> u64 {
        self.pages
    }

    /// Adds the pages set in `bitmap` (KVM dirty-log layout), which starts at page `first`.
    /// Bits past the end of the set are ignored.
    pub fn add_bitmap(&mut self, first: u64, bitmap: &[u64]) {
        for (word_index, &word) in bitmap.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let bit = u64::from(word.trailing_zeros());
                word &= word - 1;
                self.insert(first + word_index as u64 * 64 + bit);
            }
        }
    }

    pub fn insert(&mut self, page: u64) {
        if page < self.pages {
            if let Some(word) = usize::try_from(page / 64)
                .ok()
                .and_then(|i| self.bits.get_mut(i))
            {
                *word |= 1 << (page % 64);
            }
        }
    }

    pub fn contains(&self, page: u64) -> bool {
        usize::try_from(page / 64)
            .ok()
            .and_then(|i| self.bits.get(i))
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// How many pages are in the set.
    pub fn len(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|&w| w == 0)
    }

    /// Runs of consecutive pages: `(first page, count)`, in order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for page in (0..self.pages).filter(|&p| self.contains(p)) {
            match runs.last_mut() {
                Some((first, count)) if *first + *count == page => *count += 1,
                _ => runs.push((page, 1)),
            }
        }
        runs
    }

    /// Whether the set is well formed for a guest of `bytes` bytes (a decoded state file
    /// is checked with this before its pages are mapped).
    pub fn fits(&self, bytes: u64) -> bool {
        let tail = self.pages % 64;
        let no_bits_past_the_end = tail == 0 || self.bits.last().is_none_or(|w| w >> tail == 0);
        self.pages == bytes.div_ceil(PAGE)
            && self.bits.len() as u64 == self.pages.div_ceil(64)
            && no_bits_past_the_end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_merge_into_runs() {
        let mut set = PageSet::new(300 * PAGE);
        set.add_bitmap(0, &[0b1110, 1 << 63]);
        set.add_bitmap(128, &[0b1]);
        set.insert(299);
        set.insert(300); // past the end: ignored
        assert_eq!(set.runs(), vec![(1, 3), (127, 2), (299, 1)]);
        assert_eq!(set.len(), 6);
        assert!(set.fits(300 * PAGE));
        assert!(!set.fits(301 * PAGE));
        assert!(!PageSet::new(0).contains(0));
    }

    #[test]
    fn a_set_with_bits_past_its_end_does_not_fit() {
        let mut set = PageSet::new(10 * PAGE);
        set.bits[0] |= 1 << 20;
        assert!(!set.fits(10 * PAGE));
    }
}
