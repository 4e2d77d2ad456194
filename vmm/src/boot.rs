//! Loading a Linux kernel, its initramfs and command line into guest memory, and writing
//! the zero page (`struct boot_params`) with the e820 map.
//!
//! Both an uncompressed ELF `vmlinux` and a `bzImage` are accepted; either way the vCPU
//! enters the kernel's 64-bit entry point with paging on (see `arch::x86_64::regs`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::arch::x86_64::layout::{
    CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, MPTABLE_START,
    ZERO_PAGE,
};
use crate::memory::{ram_ranges, GuestMemory as Memory};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Values the boot protocol asks a loader to put in the setup header.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HEADER_MAGIC: u32 = 0x5372_6448; // "HdrS"
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// Where the 64-bit entry point sits in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    KernelOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a Linux kernel: expected an ELF vmlinux or a bzImage")]
    NotAKernel { path: PathBuf },
    #[error("cannot load kernel {path}: {source}")]
    KernelLoad {
        path: PathBuf,
        source: loader::Error,
    },
    #[error("cannot read initramfs {path}: {source}")]
    InitrdRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory above the kernel; give the VM more --memory")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write boot data into guest memory: {0}")]
    Memory(String),
}

/// What the boot vCPU needs to know about the loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct KernelEntry {
    /// Guest-physical address of the 64-bit entry point.
    pub entry: GuestAddress,
}

/// Loads `kernel` (and `initrd`) into `mem` and writes the command line and zero page.
pub fn load_linux(
    mem: &Memory,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<KernelEntry, BootError> {
    let mut file = File::open(kernel).map_err(|source| BootError::KernelOpen {
        path: kernel.to_owned(),
        source,
    })?;
    let load_err = |source| BootError::KernelLoad {
        path: kernel.to_owned(),
        source,
    };
    let (result, entry) = match detect_format(&mut file, kernel)? {
        KernelFormat::Elf => {
            // With no load offset, the ELF loader reports `e_entry` (for a vmlinux, the
            // physical address of `startup_64`) as `kernel_load`.
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let entry = r.kernel_load;
            (r, entry)
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let entry = r.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET);
            (r, entry)
        }
    };

    let mut params = boot_params::default();
    if let Some(hdr) = result.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = BOOT_FLAG_MAGIC;
        params.hdr.header = HEADER_MAGIC;
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
        params.hdr.initrd_addr_max = 0x7fff_ffff;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;

    write_cmdline(mem, cmdline)?;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_ADDR).unwrap_or(0);
    params.hdr.cmdline_size = u32::try_from(cmdline.len() + 1).unwrap_or(u32::MAX);

    if let Some(path) = initrd {
        let (addr, size) = load_initrd(mem, path, result.kernel_end, params.hdr.initrd_addr_max)?;
        params.hdr.ramdisk_image = u32::try_from(addr.raw_value()).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(size).unwrap_or(0);
    }

    let map = e820_map(mem_size(mem));
    params.e820_entries = u8::try_from(map.len()).unwrap_or(0);
    params.e820_table[..map.len()].copy_from_slice(&map);
    LinuxBootConfigurator::write_bootparams::<Memory>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|e| BootError::Memory(e.to_string()))?;
    Ok(KernelEntry { entry })
}

enum KernelFormat {
    Elf,
    BzImage,
}

/// Tells an ELF from a bzImage by their magic numbers.
fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let mut head = [0u8; 0x206];
    let read = read_at(file, 0, &mut head).map_err(|source| BootError::KernelOpen {
        path: path.to_owned(),
        source,
    })?;
    if read >= 4 && head[..4] == *b"\x7fELF" {
        Ok(KernelFormat::Elf)
    } else if read >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(KernelFormat::BzImage)
    } else {
        Err(BootError::NotAKernel {
            path: path.to_owned(),
        })
    }
}

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    file.seek(SeekFrom::Start(offset))?;
    let mut total = 0;
    while total < buf.len() {
        match file.read(&mut buf[total..])? {
            0 => break,
            n => total += n,
        }
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(total)
}

fn write_cmdline(mem: &Memory, cmdline: &str) -> Result<(), BootError> {
    let mut line =
        linux_loader::cmdline::Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if !cmdline.trim().is_empty() {
        line.insert_str(cmdline.trim())
            .map_err(BootError::Cmdline)?;
    }
    loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &line)
        .map_err(|e| BootError::Memory(e.to_string()))
}

/// Puts the initramfs at the top of low RAM (below the MMIO gap and the kernel's limit),
/// page-aligned, above the kernel.
fn load_initrd(
    mem: &Memory,
    path: &Path,
    kernel_end: u64,
    addr_max: u32,
) -> Result<(GuestAddress, u64), BootError> {
    let read_err = |source| BootError::InitrdRead {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_owned(),
        size,
    };
    let low_end = mem_size(mem)
        .min(MMIO_GAP_START)
        .min(u64::from(addr_max) + 1);
    let start = low_end.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if start < kernel_end || size == 0 && start == 0 {
        return Err(too_large());
    }
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
        addr = addr.unchecked_add(written as u64);
    }
    Ok((GuestAddress(start), size))
}

/// Total RAM bytes, from the regions (the MMIO gap is not RAM).
fn mem_size(mem: &Memory) -> u64 {
    let last = mem.last_addr().raw_value() + 1;
    if last > MMIO_GAP_END {
        last - (MMIO_GAP_END - MMIO_GAP_START)
    } else {
        last
    }
}

/// The e820 map for `size` bytes of RAM: base memory, the reserved area holding the MP
/// table up to 1 MiB, then RAM from 1 MiB (split around the MMIO gap).
fn e820_map(size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, kind| boot_e820_entry {
        addr,
        size,
        r#type: kind,
    };
    let mut map = vec![
        entry(0, MPTABLE_START, E820_RAM),
        entry(MPTABLE_START, HIMEM_START - MPTABLE_START, E820_RESERVED),
    ];
    for (addr, len, _) in ram_ranges(size) {
        let start = addr.raw_value().max(HIMEM_START);
        let end = addr.raw_value() + len;
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_around_the_gap() {
        let map = e820_map(4 << 30);
        let ram: u64 = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (4 << 30) - (HIMEM_START - MPTABLE_START));
        let last_addr = map.last().unwrap().addr;
        assert_eq!(last_addr, MMIO_GAP_END);
        assert!(map.iter().all(|e| {
            let (addr, size) = (e.addr, e.size);
            addr + size <= MMIO_GAP_START || addr >= MMIO_GAP_END
        }));
    }

    #[test]
    fn a_text_file_is_not_a_kernel() {
        let path = std::env::temp_dir().join(format!("kiln-not-a-kernel-{}", std::process::id()));
        std::fs::write(&path, b"hello, I am not a kernel").unwrap();
        let mem = crate::memory::create(32 << 20).unwrap();
        let err = load_linux(&mem, &path, None, "").unwrap_err();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
