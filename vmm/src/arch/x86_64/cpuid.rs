//! CPUID for one vCPU: what KVM supports, with the topology and APIC ID of this vCPU and
//! leaf 0xD made consistent (`super::xsave`).
//!
//! Each vCPU is presented as one core of a single socket, one thread per core, so that
//! Linux's view (`nproc`, /proc/cpuinfo) matches `--vcpus` on Intel and AMD hosts alike.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use super::xsave::Xsave;

/// CPUID.1:ECX bit 31: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// CPUID.0xB/0x1F level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `count` cores in an APIC ID.
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// Rewrites `cpuid` (from KVM_GET_SUPPORTED_CPUID) for vCPU `index` of `count`. Returns
/// the XSAVE state the vCPU is given (`None`: no XSAVE), whose XCR0 it must start with.
pub fn configure(
    cpuid: &mut CpuId,
    index: u8,
    count: u8,
) -> Result<Option<Xsave>, vmm_sys_util::fam::Error> {
    let xsave = super::xsave::normalize(cpuid)?;
    let apic_id = u32::from(index);
    let count32 = u32::from(count);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            0x1 => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | ((count32 & 0xff) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            0x4 => {
                // EAX[31:26]: cores per package - 1. EAX[25:14]: threads sharing this cache - 1;
                // only the last-level (L3) cache is shared between cores.
                let cache_level = (entry.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count32 - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | ((count32 - 1) << 26);
            }
            // No virtual PMU: guests must not try to program performance counters.
            0xa => {
                *entry = kvm_cpuid_entry2 {
                    function: 0xa,
                    ..Default::default()
                }
            }
            0x8000_0008 => {
                // AMD: ECX[7:0] cores - 1, ECX[15:12] APIC ID bits for cores.
                entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(count) << 12) | (count32 - 1);
            }
            0x8000_001e => {
                // AMD extended topology: APIC ID, core ID, one thread per core, node 0.
                entry.eax = apic_id;
                entry.ebx = apic_id & 0xff;
                entry.ecx = 0;
            }
            _ => {}
        }
    }
    replace_topology_leaf(cpuid, 0xb, apic_id, count)?;
    if cpuid.as_slice().iter().any(|e| e.function == 0x1f) {
        replace_topology_leaf(cpuid, 0x1f, apic_id, count)?;
    }
    Ok(xsave)
}

/// Writes the extended topology leaf (0xB or 0x1F): an SMT level of one thread and a core
/// level of `count` cores, then the terminating invalid level.
fn replace_topology_leaf(
    cpuid: &mut CpuId,
    function: u32,
    apic_id: u32,
    count: u8,
) -> Result<(), vmm_sys_util::fam::Error> {
    let kept: Vec<kvm_cpuid_entry2> = cpuid
        .as_slice()
        .iter()
        .filter(|e| e.function != function)
        .copied()
        .collect();
    let level = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: index | (level_type << 8),
        edx: apic_id,
        ..Default::default()
    };
    let mut entries = kept;
    entries.push(level(0, 0, 1, LEVEL_TYPE_SMT));
    entries.push(level(1, id_bits(count), u32::from(count), LEVEL_TYPE_CORE));
    entries.push(level(2, 0, 0, 0));
    *cpuid = CpuId::from_entries(&entries)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 0x1,
                ebx: 0x0008_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4,
                index: 3,
                eax: 3 << 5,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0008,
                ecx: 0xffff,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn apic_id_and_counts_per_vcpu() {
        let mut c = base();
        configure(&mut c, 3, 4).unwrap();
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_eq!(find(&c, 4, 3).eax >> 26, 3);
        assert_eq!(find(&c, 0xb, 1).ebx, 4);
        assert_eq!(find(&c, 0xb, 1).eax, 2);
        assert_eq!(find(&c, 0xb, 0).edx, 3);
        assert_eq!(find(&c, 0xb, 2).ecx >> 8, 0);
        assert_eq!(c.as_slice().iter().filter(|e| e.function == 0xb).count(), 3);
        assert_eq!(find(&c, 0x8000_0008, 0).ecx & 0xf0ff, (2 << 12) | 3);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut c = base();
        configure(&mut c, 0, 1).unwrap();
        assert_eq!(find(&c, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(find(&c, 0xb, 1).eax, 0);
    }
}
