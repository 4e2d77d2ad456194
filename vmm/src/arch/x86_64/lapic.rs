//! Local APIC set-up: the LINT0/LINT1 wiring that the MP table announces.

use kvm_bindings::kvm_lapic_state;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const DELIVERY_MODE_EXTINT: u32 = 0x7;
const DELIVERY_MODE_NMI: u32 = 0x4;

fn read_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn write_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as std::os::raw::c_char;
    }
}

/// LVT entries keep their other bits; only the delivery mode (bits 8..=10) changes.
fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

pub fn set_lints(lapic: &mut kvm_lapic_state) {
    let lint0 = read_reg(lapic, APIC_LVT0);
    write_reg(
        lapic,
        APIC_LVT0,
        with_delivery_mode(lint0, DELIVERY_MODE_EXTINT),
    );
    let lint1 = read_reg(lapic, APIC_LVT1);
    write_reg(
        lapic,
        APIC_LVT1,
        with_delivery_mode(lint1, DELIVERY_MODE_NMI),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lints_get_extint_and_nmi() {
        let mut lapic = kvm_lapic_state::default();
        write_reg(&mut lapic, APIC_LVT0, 0x0001_0000);
        set_lints(&mut lapic);
        assert_eq!(read_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(read_reg(&lapic, APIC_LVT1), 0x0000_0400);
    }
}
