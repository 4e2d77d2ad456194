//! Loading a Linux kernel, its initramfs and command line into guest memory, and writing
//! the zero page (`struct boot_params`) with the e820 map.
//!
//! Both an uncompressed ELF `vmlinux` and a `bzImage` are accepted; either way the vCPU
//! enters the kernel's 64-bit entry point with paging on (see `arch::x86_64::regs`). Where
//! the initramfs goes is `initrd`'s business.

mod initrd;

pub use initrd::{InitrdLimit, Window as InitrdWindow};

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend};

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
    #[error(
        "initramfs {path} ({size} bytes, {}) does not fit: the guest has {} ({:#x}..{:#x}) \
         for it, between the memory its kernel uses and {}",
        mib(*size), mib(window.room()), window.bottom, window.top, window.limit
    )]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        window: InitrdWindow,
    },
    #[error("initramfs {path} is empty")]
    InitrdEmpty { path: PathBuf },
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

/// Loads `kernel` (and `initrd`) into `mem` and writes the command line and zero page;
/// `rsdp` is where the ACPI tables start, if kiln wrote them.
pub fn load_linux(
    mem: &Memory,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: Option<GuestAddress>,
) -> Result<KernelEntry, BootError> {
    let mut file = File::open(kernel).map_err(|source| BootError::KernelOpen {
        path: kernel.to_owned(),
        source,
    })?;
    let load_err = |source| BootError::KernelLoad {
        path: kernel.to_owned(),
        source,
    };
    let (result, entry, kernel_end) = match detect_format(&mut file, kernel)? {
        KernelFormat::Elf => {
            // With no load offset, the ELF loader reports `e_entry` (for a vmlinux, the
            // physical address of `startup_64`) as `kernel_load`, and the end of its
            // segments in memory (bss included) as `kernel_end`.
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let (entry, end) = (r.kernel_load, r.kernel_end);
            (r, entry, end)
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let entry = r.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET);
            let end = r.setup_header.map_or(r.kernel_end, |hdr| {
                bzimage_end(&hdr, r.kernel_load.raw_value(), r.kernel_end)
            });
            (r, entry, end)
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

    let ram = mem_size(mem);
    if let Some(path) = initrd {
        let window = InitrdWindow::new(ram, kernel_end, params.hdr.initrd_addr_max);
        let (addr, size) = initrd::load(mem, path, window)?;
        params.hdr.ramdisk_image = u32::try_from(addr.raw_value()).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(size).unwrap_or(0);
    }

    if let Some(rsdp) = rsdp {
        params.acpi_rsdp_addr = rsdp.raw_value();
    }
    let map = e820_map(ram);
    params.e820_entries = u8::try_from(map.len()).unwrap_or(0);
    params.e820_table[..map.len()].copy_from_slice(&map);
    LinuxBootConfigurator::write_bootparams::<Memory>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|e| BootError::Memory(e.to_string()))?;
    Ok(KernelEntry { entry })
}

/// Boot protocol 2.10: the setup header has `pref_address` and `init_size`.
const PROTOCOL_WITH_INIT_SIZE: u16 = 0x020a;

/// The end of the memory a bzImage's kernel uses before it reads the memory map. Its
/// compressed payload (loaded at `loaded_at`, up to `loaded_end`) unpacks the kernel at
/// `pref_address`, or at the load address aligned to `kernel_alignment` if that is higher,
/// into `init_size` bytes; nothing kiln loads may lie there.
fn bzimage_end(hdr: &setup_header, loaded_at: u64, loaded_end: u64) -> u64 {
    let (version, align, pref, init_size) = (
        hdr.version,
        hdr.kernel_alignment,
        hdr.pref_address,
        hdr.init_size,
    );
    if version < PROTOCOL_WITH_INIT_SIZE {
        return loaded_end;
    }
    let start = loaded_at
        .next_multiple_of(u64::from(align.max(1)))
        .max(pref);
    loaded_end.max(start.saturating_add(u64::from(init_size)))
}

/// `bytes` in MiB, for messages.
fn mib(bytes: u64) -> String {
    let tenths = bytes.saturating_mul(10).div_ceil(1 << 20);
    format!("{}.{} MiB", tenths / 10, tenths % 10)
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
/// table and the ACPI tables up to 1 MiB, then RAM from 1 MiB (split around the MMIO gap).
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
    fn the_acpi_tables_lie_in_a_reserved_range() {
        use crate::arch::x86_64::layout::{ACPI_END, ACPI_START};
        let map = e820_map(128 << 20);
        assert!(map.iter().any(|e| {
            let (addr, size, kind) = (e.addr, e.size, e.r#type);
            kind == E820_RESERVED && addr <= ACPI_START && addr + size >= ACPI_END
        }));
    }

    #[test]
    fn a_text_file_is_not_a_kernel() {
        let path = std::env::temp_dir().join(format!("kiln-not-a-kernel-{}", std::process::id()));
        std::fs::write(&path, b"hello, I am not a kernel").unwrap();
        let mem = crate::memory::create(32 << 20).unwrap();
        let err = load_linux(&mem, &path, None, "", None).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
        std::fs::remove_file(&path).unwrap();
    }

    const MIB: u64 = 1 << 20;

    /// A bzImage as far as the boot protocol goes: one setup sector after the boot sector,
    /// a 2.15 setup header loading at 1 MiB that unpacks at 16 MiB into 16 MiB and reads
    /// an initramfs below 48 MiB, and 64 KiB of payload.
    fn fake_bzimage() -> Vec<u8> {
        let mut image = vec![0u8; 1024 + 64 * 1024];
        image[0x1f1] = 1; // setup_sects
        image[0x1fe..0x200].copy_from_slice(&BOOT_FLAG_MAGIC.to_le_bytes());
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020f_u16.to_le_bytes());
        image[0x211] = 1; // loadflags: LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&0x10_0000_u32.to_le_bytes());
        image[0x22c..0x230].copy_from_slice(&0x02ff_ffff_u32.to_le_bytes()); // initrd_addr_max
        image[0x230..0x234].copy_from_slice(&0x20_0000_u32.to_le_bytes()); // kernel_alignment
        image[0x258..0x260].copy_from_slice(&0x100_0000_u64.to_le_bytes()); // pref_address
        image[0x260..0x264].copy_from_slice(&0x100_0000_u32.to_le_bytes()); // init_size
        image
    }

    fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("kiln-boot-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn a_bzimage_initramfs_lies_above_its_unpacked_kernel_and_below_its_limit() {
        let kernel = scratch("bz", &fake_bzimage());
        let mem = crate::memory::create(64 * MIB).unwrap();

        // 8 MiB fit between the unpacked kernel's end (32 MiB) and initrd_addr_max (48 MiB):
        // they go right below the limit.
        let data: Vec<u8> = (0..8 * MIB).map(|i| (i % 251) as u8).collect();
        let initrd = scratch("8m", &data);
        load_linux(&mem, &kernel, Some(&initrd), "console=ttyS0", None).unwrap();
        let params: boot_params =
            vm_memory::Bytes::read_obj(&mem, GuestAddress(ZERO_PAGE)).unwrap();
        let (image, size) = (params.hdr.ramdisk_image, params.hdr.ramdisk_size);
        assert_eq!((u64::from(image), u64::from(size)), (40 * MIB, 8 * MIB));
        let mut loaded = vec![0u8; data.len()];
        vm_memory::Bytes::read_slice(&mem, &mut loaded, GuestAddress(40 * MIB)).unwrap();
        assert!(loaded == data, "the initramfs bytes are loaded as they are");

        // 20 MiB would reach into the memory the kernel unpacks itself into.
        let initrd = scratch("20m", &vec![0x1f_u8; 20 << 20]);
        let err = load_linux(&mem, &kernel, Some(&initrd), "", None).unwrap_err();
        match &err {
            BootError::InitrdTooLarge { window, .. } => {
                assert_eq!((window.bottom, window.top), (32 * MIB, 48 * MIB));
                assert_eq!(window.limit, InitrdLimit::KernelMax);
            }
            other => panic!("{other}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("(20971520 bytes, 20.0 MiB) does not fit"),
            "{text}"
        );
        assert!(text.contains("16.0 MiB (0x2000000..0x3000000)"), "{text}");
        assert!(text.contains("initrd_addr_max"), "{text}");

        let empty = scratch("empty", b"");
        let err = load_linux(&mem, &kernel, Some(&empty), "", None).unwrap_err();
        assert!(matches!(err, BootError::InitrdEmpty { .. }), "{err}");
        for path in [kernel, initrd, empty] {
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn old_boot_protocols_have_no_init_size() {
        let mut hdr = setup_header {
            version: 0x0209,
            init_size: 0x100_0000,
            pref_address: 0x100_0000,
            ..Default::default()
        };
        assert_eq!(bzimage_end(&hdr, MIB, 3 * MIB), 3 * MIB);
        hdr.version = 0x020a;
        assert_eq!(bzimage_end(&hdr, MIB, 3 * MIB), 32 * MIB);
        assert_eq!(mib(MIB + 1), "1.1 MiB");
        assert_eq!(mib(0), "0.0 MiB");
    }
}
