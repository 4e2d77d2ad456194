//! x86_64 specifics: memory layout, CPUID, MSRs, registers, local APIC, MP table.

pub mod cpuid;
pub mod lapic;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
