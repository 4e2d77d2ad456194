//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns its
//! CPUs, its IOAPIC and how ISA interrupts are wired.
//!
//! kiln describes one ISA bus whose IRQ n goes to IOAPIC pin n (the routing KVM's in-kernel
//! irqchip uses), LINT0 as ExtINT and LINT1 as NMI on every local APIC.

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory};

use super::layout::{IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR, MPTABLE_START};

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// CPUID.1 family/model/stepping and feature flags written into processor entries (the
/// kernel reads these only for display; FPU and APIC present).
const CPU_SIGNATURE: u32 = (6 << 8) | (15 << 4);
const CPU_FEATURES: u32 = 0x201;

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct FloatingPointer {
    signature: [u8; 4],
    table_addr: u32,
    length_paragraphs: u8,
    spec_rev: u8,
    checksum: u8,
    features: [u8; 5],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct TableHeader {
    signature: [u8; 4],
    length: u16,
    spec_rev: u8,
    checksum: u8,
    oem_id: [u8; 8],
    product_id: [u8; 12],
    oem_table: u32,
    oem_table_size: u16,
    entry_count: u16,
    lapic_addr: u32,
    ext_length: u16,
    ext_checksum: u8,
    reserved: u8,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct ProcessorEntry {
    kind: u8,
    apic_id: u8,
    apic_version: u8,
    flags: u8,
    signature: u32,
    features: u32,
    reserved: [u32; 2],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct BusEntry {
    kind: u8,
    bus_id: u8,
    bus_type: [u8; 6],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct IoApicEntry {
    kind: u8,
    apic_id: u8,
    version: u8,
    flags: u8,
    addr: u32,
}

/// Both I/O interrupt (kind 3) and local interrupt (kind 4) assignments have this shape.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct InterruptEntry {
    kind: u8,
    int_type: u8,
    flags: u16,
    src_bus: u8,
    src_irq: u8,
    dst_apic: u8,
    dst_pin: u8,
}

// SAFETY: each struct is repr(C, packed), made only of integers and byte arrays, so every
// bit pattern is a valid value and there is no padding.
unsafe impl ByteValued for FloatingPointer {}
// SAFETY: as above.
unsafe impl ByteValued for TableHeader {}
// SAFETY: as above.
unsafe impl ByteValued for ProcessorEntry {}
// SAFETY: as above.
unsafe impl ByteValued for BusEntry {}
// SAFETY: as above.
unsafe impl ByteValued for IoApicEntry {}
// SAFETY: as above.
unsafe impl ByteValued for InterruptEntry {}

/// Two's-complement byte sum, so that the bytes of a structure add up to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The table body (everything after the header) for `vcpus` CPUs.
fn entries(vcpus: u8) -> (Vec<u8>, u16) {
    let mut body = Vec::new();
    let mut count = 0u16;
    let mut push = |bytes: &[u8]| {
        body.extend_from_slice(bytes);
        count += 1;
    };
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        let cpu = ProcessorEntry {
            kind: 0,
            apic_id: id,
            apic_version: APIC_VERSION,
            flags,
            signature: CPU_SIGNATURE,
            features: CPU_FEATURES,
            reserved: [0; 2],
        };
        push(cpu.as_slice());
    }
    push(
        BusEntry {
            kind: 1,
            bus_id: 0,
            bus_type: *b"ISA   ",
        }
        .as_slice(),
    );
    let ioapic_id = vcpus;
    push(
        IoApicEntry {
            kind: 2,
            apic_id: ioapic_id,
            version: IOAPIC_VERSION,
            flags: 1,
            addr: IOAPIC_ADDR,
        }
        .as_slice(),
    );
    for irq in 0..IOAPIC_PINS {
        let int = InterruptEntry {
            kind: 3,
            int_type: INT_TYPE_INT,
            flags: 0,
            src_bus: 0,
            src_irq: irq,
            dst_apic: ioapic_id,
            dst_pin: irq,
        };
        push(int.as_slice());
    }
    for (int_type, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        let local = InterruptEntry {
            kind: 4,
            int_type,
            flags: 0,
            src_bus: 0,
            src_irq: 0,
            dst_apic: 0xff,
            dst_pin: lint,
        };
        push(local.as_slice());
    }
    (body, count)
}

/// Writes the floating pointer and the table at [`MPTABLE_START`]; returns its size.
pub fn write<M: GuestMemory>(mem: &M, vcpus: u8) -> Result<usize, vm_memory::GuestMemoryError> {
    let table_addr = MPTABLE_START + std::mem::size_of::<FloatingPointer>() as u64;
    let (body, entry_count) = entries(vcpus);
    let length = std::mem::size_of::<TableHeader>() + body.len();
    let mut header = TableHeader {
        signature: *b"PCMP",
        length: u16::try_from(length).unwrap_or(u16::MAX),
        spec_rev: 4,
        oem_id: *b"KILN    ",
        product_id: *b"MICROVM     ",
        entry_count,
        lapic_addr: LAPIC_ADDR,
        ..Default::default()
    };
    let mut table = header.as_slice().to_vec();
    table.extend_from_slice(&body);
    header.checksum = checksum(&table);
    table[..std::mem::size_of::<TableHeader>()].copy_from_slice(header.as_slice());

    let mut fp = FloatingPointer {
        signature: *b"_MP_",
        table_addr: u32::try_from(table_addr).unwrap_or(0),
        length_paragraphs: 1,
        spec_rev: 4,
        ..Default::default()
    };
    fp.checksum = checksum(fp.as_slice());
    mem.write_obj(fp, GuestAddress(MPTABLE_START))?;
    mem.write_slice(&table, GuestAddress(table_addr))?;
    Ok(std::mem::size_of::<FloatingPointer>() + table.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_counts_hold() {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let size = write(&mem, 4).unwrap();
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(sum(&fp), 0);
        let mut table = vec![0u8; size - 16];
        mem.read_slice(&mut table, GuestAddress(MPTABLE_START + 16))
            .unwrap();
        assert_eq!(&table[..4], b"PCMP");
        assert_eq!(sum(&table), 0);
        let header: TableHeader = mem.read_obj(GuestAddress(MPTABLE_START + 16)).unwrap();
        let (count, length) = (header.entry_count, header.length);
        // 4 CPUs, 1 bus, 1 IOAPIC, 24 interrupt sources, 2 local interrupts.
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
        assert_eq!(usize::from(length), table.len());
        // The table must end below the start of the BIOS area at 1 MiB.
        assert!(MPTABLE_START + size as u64 <= 0x10_0000);
    }

    #[test]
    fn only_the_first_cpu_is_the_boot_processor() {
        let (body, _) = entries(3);
        let cpus: Vec<&[u8]> = body.chunks(20).take(3).collect();
        assert_eq!(cpus[0][3], CPU_ENABLED | CPU_BOOT_PROCESSOR);
        assert_eq!(cpus[1][3], CPU_ENABLED);
        assert_eq!(cpus[2][1], 2);
    }
}
