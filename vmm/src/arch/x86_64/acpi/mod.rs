//! ACPI tables: how a kernel built without `X86_MPPARSE` (distribution kernels) learns its
//! CPUs, its IOAPIC and its devices.
//!
//! kiln presents a hardware-reduced ACPI machine (no PM timer, GPE or SCI; the FADT says
//! so): an RSDP pointing at an XSDT, which lists the FADT and the MADT; the FADT points at
//! the DSDT. The MADT has a local APIC per vCPU, the IOAPIC, the interrupt source
//! overrides of the ISA lines in use and the LINT1 NMI; the DSDT has COM1 and every
//! virtio-mmio device (`LNRO0005`). All of it sits in [`ACPI_START`]..[`ACPI_END`], which
//! the e820 map reserves, and the zero page's `acpi_rsdp_addr` points at the RSDP too.
//! The MP table is written beside it for kernels without ACPI. The tables are written once,
//! at boot: a restored VM has them in its memory as its guest left them.

mod dsdt;
mod madt;

use acpi_tables::{fadt, rsdp::Rsdp, xsdt::XSDT, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{ACPI_END, ACPI_START};

/// The OEM fields of every table.
pub const OEM_ID: [u8; 6] = *b"KILN  ";
pub const OEM_TABLE_ID: [u8; 8] = *b"KILNVM  ";
const OEM_REVISION: u32 = 1;
/// Each table starts on this boundary.
const TABLE_ALIGN: u64 = 16;
/// FADT `IAPC_BOOT_ARCH`: no VGA, no MSI (there is no PCI), no CMOS RTC.
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Base of its register window.
    pub base: u64,
    /// Length of its register window.
    pub size: u64,
    /// Its IOAPIC pin (GSI).
    pub irq: u32,
}

/// What the tables describe.
#[derive(Debug, Clone)]
pub struct Machine<'a> {
    pub vcpus: u8,
    /// The 8250 UART: its first port and its interrupt line.
    pub serial: (u16, u32),
    pub virtio: &'a [MmioDevice],
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error(
        "ACPI tables of {size} bytes do not fit in {:#x}..{:#x}",
        ACPI_START,
        ACPI_END
    )]
    TooLarge { size: u64 },
    #[error("virtio-mmio window {0:#x} is not a 32-bit address, which the DSDT needs")]
    WindowAbove4G(u64),
    #[error("cannot write ACPI tables into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Writes the tables for `machine` at [`ACPI_START`]; returns the RSDP's address.
pub fn write<M: GuestMemory>(mem: &M, machine: &Machine) -> Result<GuestAddress, AcpiError> {
    let mut place = Placer::new(ACPI_START);
    let rsdp_addr = place.next(Rsdp::len());
    let dsdt = bytes(&dsdt::build(machine)?);
    let dsdt_addr = place.next(dsdt.len());
    let fadt = bytes(&fadt(dsdt_addr));
    let fadt_addr = place.next(fadt.len());
    let madt = bytes(&madt::build(machine));
    let madt_addr = place.next(madt.len());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes(&xsdt);
    let xsdt_addr = place.next(xsdt.len());
    if place.at > ACPI_END {
        return Err(AcpiError::TooLarge {
            size: place.at - ACPI_START,
        });
    }
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    for (addr, table) in [
        (rsdp_addr, &rsdp),
        (xsdt_addr, &xsdt),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
    ] {
        mem.write_slice(table, GuestAddress(addr))?;
    }
    Ok(GuestAddress(rsdp_addr))
}

/// The FADT of a hardware-reduced machine whose DSDT is at `dsdt`.
fn fadt(dsdt: u64) -> fadt::FADT {
    let mut builder = fadt::FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(fadt::Flags::HwReducedAcpi)
        .flag(fadt::Flags::PwrButton)
        .flag(fadt::Flags::SlpButton);
    builder.iapc_boot_arch =
        (BOOT_ARCH_VGA_NOT_PRESENT | BOOT_ARCH_MSI_NOT_SUPPORTED | BOOT_ARCH_CMOS_RTC_NOT_PRESENT)
            .into();
    builder.finalize()
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// Hands out aligned addresses one table after another.
struct Placer {
    at: u64,
}

impl Placer {
    fn new(start: u64) -> Self {
        Placer { at: start }
    }

    fn next(&mut self, len: usize) -> u64 {
        let addr = self.at.next_multiple_of(TABLE_ALIGN);
        self.at = addr + len as u64;
        addr
    }
}

#[cfg(test)]
mod tests;
