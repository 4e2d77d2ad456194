//! Where the initramfs goes in guest memory, and loading it there.
//!
//! kiln loads the file's bytes as they are: the kernel unpacks it, so any format the guest
//! kernel reads works — a plain newc cpio, one compressed with gzip, zstd, xz (with CRC32
//! checks, as distributions make them), or several archives one after another (an
//! uncompressed microcode cpio in front of a compressed main one). The boot protocol only
//! asks for its address and size in the setup header, and that it lie where the kernel can
//! reach it; kiln puts it as high as that allows, above everything the kernel uses before
//! it reads the memory map.

use std::fs::File;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::arch::x86_64::layout::MMIO_GAP_START;
use crate::memory::GuestMemory as Memory;

const PAGE: u64 = 0x1000;

/// What ends the room for an initramfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitrdLimit {
    /// The end of the guest's RAM.
    Memory,
    /// The MMIO gap below 4 GiB (RAM goes on above it, but the initramfs must be in one
    /// piece below `initrd_addr_max`).
    MmioGap,
    /// The kernel's `initrd_addr_max`: the highest address it reads an initramfs from.
    KernelMax,
}

impl std::fmt::Display for InitrdLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InitrdLimit::Memory => "the end of guest memory; give the VM more --memory",
            InitrdLimit::MmioGap => {
                "the MMIO gap at 3 GiB, below which the initramfs must lie; make it smaller"
            }
            InitrdLimit::KernelMax => {
                "the highest address this kernel reads an initramfs from (initrd_addr_max in \
                 its setup header); make the initramfs smaller"
            }
        })
    }
}

/// The guest-physical range an initramfs may occupy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The first byte above what the kernel uses before it reads the memory map.
    pub bottom: u64,
    /// One past the highest byte the initramfs may occupy.
    pub top: u64,
    /// What sets `top`.
    pub limit: InitrdLimit,
}

impl Window {
    /// The window for a guest with `ram` bytes of RAM, whose kernel uses memory up to
    /// `kernel_end` and reads an initramfs at addresses up to `addr_max` (inclusive).
    pub fn new(ram: u64, kernel_end: u64, addr_max: u32) -> Self {
        let (mut top, mut limit) = (ram, InitrdLimit::Memory);
        for (end, why) in [
            (MMIO_GAP_START, InitrdLimit::MmioGap),
            (u64::from(addr_max) + 1, InitrdLimit::KernelMax),
        ] {
            if end < top {
                (top, limit) = (end, why);
            }
        }
        Window {
            bottom: kernel_end.next_multiple_of(PAGE),
            top,
            limit,
        }
    }

    /// Where an initramfs of `size` bytes starts: page-aligned, as high as it fits.
    /// `None` if it does not fit.
    pub fn place(&self, size: u64) -> Option<u64> {
        let start = self.top.checked_sub(size)? & !(PAGE - 1);
        (start >= self.bottom).then_some(start)
    }

    /// How many bytes the window holds.
    pub fn room(&self) -> u64 {
        self.top.saturating_sub(self.bottom)
    }
}

/// Loads the initramfs at `path` into `mem`, placed in `window`; returns its address and
/// size.
pub fn load(mem: &Memory, path: &Path, window: Window) -> Result<(GuestAddress, u64), BootError> {
    let read_err = |source| BootError::InitrdRead {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    if size == 0 {
        return Err(BootError::InitrdEmpty {
            path: path.to_owned(),
        });
    }
    let start = window
        .place(size)
        .ok_or_else(|| BootError::InitrdTooLarge {
            path: path.to_owned(),
            size,
            window,
        })?;
    let mut remaining = size;
    let mut addr = GuestAddress(start);
    while remaining > 0 {
        let chunk = usize::try_from(remaining.min(1 << 20)).unwrap_or(1 << 20);
        let written = mem
            .read_volatile_from(addr, &mut file, chunk)
            .map_err(|e| BootError::Memory(e.to_string()))?;
        if written == 0 {
            return Err(read_err(std::io::ErrorKind::UnexpectedEof.into()));
        }
        remaining -= written as u64;
        addr = GuestAddress(addr.0 + written as u64);
    }
    Ok((GuestAddress(start), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_lowest_limit_ends_the_window() {
        let w = Window::new(256 * MIB, 32 * MIB, 0x7fff_ffff);
        assert_eq!(
            (w.bottom, w.top, w.limit),
            (32 * MIB, 256 * MIB, InitrdLimit::Memory)
        );
        let w = Window::new(4096 * MIB, 32 * MIB, 0x7fff_ffff);
        assert_eq!((w.top, w.limit), (0x8000_0000, InitrdLimit::KernelMax));
        let w = Window::new(4096 * MIB, 32 * MIB, 0xffff_ffff);
        assert_eq!((w.top, w.limit), (MMIO_GAP_START, InitrdLimit::MmioGap));
        // A kernel ending mid-page leaves the initramfs the next page.
        assert_eq!(
            Window::new(64 * MIB, 0x10_0001, 0x7fff_ffff).bottom,
            0x10_1000
        );
    }

    #[test]
    fn an_initramfs_goes_as_high_as_it_fits() {
        let w = Window::new(128 * MIB, 32 * MIB, 0x7fff_ffff);
        assert_eq!(w.place(MIB), Some(127 * MIB));
        // Rounded down to a page, so its end stays inside.
        assert_eq!(w.place(MIB + 1), Some(127 * MIB - PAGE));
        assert_eq!(w.place(96 * MIB), Some(32 * MIB));
        assert_eq!(w.place(96 * MIB + 1), None);
        assert_eq!(w.place(u64::MAX), None);
        assert_eq!(w.room(), 96 * MIB);
    }

    #[test]
    fn initrd_addr_max_is_respected() {
        // A kernel that reads an initramfs only below 16 MiB, in a 64 MiB guest.
        let w = Window::new(64 * MIB, 4 * MIB, 0x00ff_ffff);
        let start = w.place(3 * MIB).unwrap();
        assert!(start + 3 * MIB <= 16 * MIB, "{start:#x}");
        assert_eq!(w.place(13 * MIB), None);
        assert_eq!(w.limit, InitrdLimit::KernelMax);
    }
}
