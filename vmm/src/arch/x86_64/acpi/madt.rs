//! The MADT: a local APIC per vCPU, the IOAPIC, how the ISA lines in use reach it, and
//! where each local APIC's NMI comes in. It says what the MP table says, in ACPI's terms.

use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::{Aml, AmlSink};
use zerocopy::little_endian::{U16, U32};
use zerocopy::{Immutable, IntoBytes};

use super::{Machine, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::arch::x86_64::layout::{IOAPIC_ADDR, LAPIC_ADDR};

const TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const TYPE_LOCAL_APIC_NMI: u8 = 4;
/// MPS INTI flags: active high (bits 0-1 = 01), edge triggered (bits 2-3 = 01).
const EDGE_ACTIVE_HIGH: u16 = 0b0101;
/// Every processor (ACPI processor UID 0xff).
const ALL_PROCESSORS: u8 = 0xff;
/// ISA interrupts are 0..16; a line above is not an ISA IRQ and needs no override.
const ISA_IRQS: u32 = 16;

/// ISA IRQ `source` is GSI `gsi`, with the polarity and trigger of `flags`.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32,
    flags: U16,
}

/// Local APIC pin `lint` of processor `uid` takes NMIs.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    kind: u8,
    length: u8,
    uid: u8,
    flags: U16,
    lint: u8,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// The MADT for `machine`. The IOAPIC's ID follows the vCPUs' (as in the MP table) and its
/// pins are GSIs 0..24, ISA IRQ n on pin n (KVM's in-kernel routing).
pub(super) fn build(machine: &Machine) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..machine.vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(machine.vcpus, IOAPIC_ADDR, 0));
    // The ISA lines kiln's devices use are edge triggered and active high, as ISA lines
    // are by default; saying so leaves a kernel nothing to guess.
    let mut lines: Vec<u32> = std::iter::once(machine.serial.1)
        .chain(machine.virtio.iter().map(|d| d.irq))
        .filter(|irq| *irq < ISA_IRQS)
        .collect();
    lines.sort_unstable();
    lines.dedup();
    for irq in lines {
        madt.add_structure(InterruptSourceOverride {
            kind: TYPE_INTERRUPT_SOURCE_OVERRIDE,
            length: 10,
            bus: 0,
            source: u8::try_from(irq).unwrap_or(0),
            gsi: irq.into(),
            flags: EDGE_ACTIVE_HIGH.into(),
        });
    }
    madt.add_structure(LocalApicNmi {
        kind: TYPE_LOCAL_APIC_NMI,
        length: 6,
        uid: ALL_PROCESSORS,
        flags: 0.into(),
        lint: 1,
    });
    madt
}
