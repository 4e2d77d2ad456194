//! x86_64 specifics: memory layout, CPUID (leaf 0xD in `xsave`), MSRs, registers, local
//! APIC, MP table, ACPI tables.

pub mod acpi;
pub mod cpuid;
pub mod lapic;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod xsave;
