//! Where things live in guest-physical memory on x86_64.
//!
//! Low memory follows the PC conventions Linux expects; everything kiln writes for boot
//! sits below 1 MiB, and the kernel is loaded at or above [`HIMEM_START`].

/// Global descriptor table used for the 64-bit boot.
pub const GDT_ADDR: u64 = 0x500;
/// An empty interrupt descriptor table (the kernel installs its own first thing).
pub const IDT_ADDR: u64 = 0x520;
/// Linux's "zero page": `struct boot_params`.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity-mapping page tables for the first 4 GiB: PML4, PDPT, and four PDs from
/// `PD_ADDR` (0xb000..0xf000).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// x86 Linux's COMMAND_LINE_SIZE, including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The MP floating pointer and table go in the last KiB of base memory, one of the places
/// Linux searches; the range up to 1 MiB is marked reserved in the e820 map.
pub const MPTABLE_START: u64 = 0x9fc00;
/// The ACPI tables: the RSDP first (16-byte aligned, in the BIOS area Linux scans for it),
/// then the XSDT, FADT, MADT and DSDT, all below 1 MiB in the range the e820 map reserves.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Start of memory above the legacy hole.
pub const HIMEM_START: u64 = 0x10_0000;
/// Guest RAM stops here and resumes at 4 GiB: the gap is for MMIO (IOAPIC, LAPIC, devices).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Default base of the IOAPIC and of the local APIC.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Base of the window where MMIO devices (virtio-mmio, test devices) are placed.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// Interrupt lines the in-kernel IOAPIC has.
pub const IOAPIC_PINS: u8 = 24;
