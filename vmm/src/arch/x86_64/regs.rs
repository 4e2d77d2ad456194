//! Initial register state of a vCPU: 64-bit long mode with identity-mapped low memory (the
//! Linux 64-bit boot protocol), or 16-bit real mode for hand-made test guests.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{BOOT_STACK, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, ZERO_PAGE};

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Page directories (one per GiB) of the boot identity map.
const PD_PAGES: u64 = 4;

/// Page-table entry bits: present, writable, 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PTE_HUGE: u64 = 0x80;

/// How a vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    /// Long mode, paging on, `rsi` pointing at the zero page: Linux's 64-bit entry.
    Long,
    /// Real mode with CS base 0: for tiny hand-made guests.
    Real,
}

/// A GDT entry from its parts (Intel SDM vol. 3, 3.4.5).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The boot GDT: null, 64-bit code, data, TSS.
const BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The `kvm_segment` that loading GDT entry `index` into a segment register would give.
fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let granular = bit(55) == 1;
    let limit = if granular {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

/// Writes the boot GDT, an empty IDT and identity page tables for the first 4 GiB (RAM
/// below the gap, and the MMIO devices, IOAPIC and LAPIC above it).
pub fn write_boot_tables<M: GuestMemory>(mem: &M) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    mem.write_obj(PDPT_ADDR | PTE_PRESENT_RW, GuestAddress(PML4_ADDR))?;
    for gib in 0..PD_PAGES {
        let pd = PD_ADDR + gib * 0x1000;
        mem.write_obj(pd | PTE_PRESENT_RW, GuestAddress(PDPT_ADDR + gib * 8))?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            mem.write_obj(addr | PTE_PRESENT_RW | PTE_HUGE, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

/// Special registers for `mode`, starting from what KVM gave the vCPU.
pub fn boot_sregs(mut sregs: kvm_sregs, mode: CpuMode) -> kvm_sregs {
    match mode {
        CpuMode::Long => {
            let code = segment_from_gdt(BOOT_GDT[1], 1);
            let data = segment_from_gdt(BOOT_GDT[2], 2);
            sregs.gdt.base = GDT_ADDR;
            sregs.gdt.limit = u16::try_from(BOOT_GDT.len() * 8 - 1).unwrap_or(u16::MAX);
            sregs.idt.base = IDT_ADDR;
            sregs.idt.limit = 7;
            sregs.cs = code;
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.tr = segment_from_gdt(BOOT_GDT[3], 3);
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        CpuMode::Real => {
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
        }
    }
    sregs
}

/// General registers: entry point, stack, and for Linux `rsi` = the zero page.
pub fn boot_regs(entry: u64, mode: CpuMode) -> kvm_regs {
    match mode {
        CpuMode::Long => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK,
            rbp: BOOT_STACK,
            rsi: ZERO_PAGE,
            ..Default::default()
        },
        CpuMode::Real => kvm_regs {
            rflags: 0x2,
            rip: entry,
            ..Default::default()
        },
    }
}

/// FPU state as after FNINIT, with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_ring0() {
        let cs = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.present, cs.s), (1, 0, 0, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.selector, 8);
        let ds = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
    }

    #[test]
    fn page_tables_identity_map_the_first_4_gib() {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8 * 511)).unwrap();
        assert_eq!(pde & !0xfff, 511 << 21);
        assert_ne!(pde & PTE_HUGE, 0);
        // The fourth GiB (MMIO devices, IOAPIC, LAPIC) is mapped too.
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPT_ADDR + 8 * 3)).unwrap();
        assert_eq!(pdpte & !0xfff, PD_ADDR + 3 * 0x1000);
        let last: u64 = mem
            .read_obj(GuestAddress(PD_ADDR + 3 * 0x1000 + 8 * 511))
            .unwrap();
        assert_eq!(last & !0xfff, 0xffe0_0000);
    }
}
