//! CPUID leaf 0xD (XSAVE state components) made consistent with the rest of a vCPU's CPUID.
//!
//! KVM_GET_SUPPORTED_CPUID describes the host's XSAVE components as KVM can save them, but
//! it does not tie them to the feature flags the same table offers (a `/dev/kvm` may list
//! AVX-512 state with no AVX-512F flag in leaf 7, or XSAVE state with no XSAVE in leaf 1),
//! and it sizes subleaf 0 for its own idea of the guest's XCR0. Linux cross-checks all of
//! it at boot (`fpu__init_system_xstate`): a component it enables must be offered by its
//! feature flag, have the size of its structure, and the sizes CPUID reports must add up
//! to what it computes from the components' offsets and sizes, or it prints "XSAVE
//! consistency problem" with a kernel WARNING and turns XSAVE off.
//!
//! [`normalize`] keeps the components kiln gives a guest — those KVM supports, whose
//! feature flag the table offers, described by a subleaf of their kind — with the sizes
//! and offsets KVM reported, and rewrites subleaves 0 and 1 to match. kiln then starts the
//! vCPU with XCR0 holding exactly those user components (what Linux enables), so that the
//! sizes KVM derives from the vCPU's XCR0 agree with the guest's even where KVM does not
//! see the guest's XSETBV (the nested test bed's QEMU does not intercept it).

use kvm_bindings::{kvm_cpuid_entry2, kvm_xcrs, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_XSAVE: u32 = 0xd;

/// CPUID.1:ECX.
const ECX1_XSAVE: u32 = 1 << 26;
const ECX1_AVX: u32 = 1 << 28;
/// CPUID.(7,0).
const EBX7_MPX: u32 = 1 << 14;
const EBX7_AVX512F: u32 = 1 << 16;
const ECX7_PKU: u32 = 1 << 3;
const ECX7_CET_SS: u32 = 1 << 7;
const EDX7_CET_IBT: u32 = 1 << 20;
/// CPUID.(0xD,1):EAX.
const EAX_D1_XSAVEC: u32 = 1 << 1;
const EAX_D1_XSAVES: u32 = 1 << 3;
const EAX_D1_XFD: u32 = 1 << 4;
/// CPUID.(0xD,i):ECX for a component i >= 2.
const ECX_DI_SUPERVISOR: u32 = 1 << 0;
const ECX_DI_ALIGN64: u32 = 1 << 1;
const ECX_DI_XFD: u32 = 1 << 2;

/// The legacy region (x87 and SSE, FXSAVE's 512 bytes) and the XSAVE header after it.
const LEGACY_AND_HEADER: u32 = 512 + 64;

/// XSAVE state components (bit numbers in XCR0 and IA32_XSS).
const FP: u32 = 0;
const SSE: u32 = 1;
const YMM: u32 = 2;
const BNDREGS: u32 = 3;
const BNDCSR: u32 = 4;
const OPMASK: u32 = 5;
const ZMM_HI256: u32 = 6;
const HI16_ZMM: u32 = 7;
const PKRU: u32 = 9;
const CET_USER: u32 = 11;
const CET_SUPERVISOR: u32 = 12;

const fn bit(component: u32) -> u64 {
    1 << component
}

const AVX512: u64 = bit(OPMASK) | bit(ZMM_HI256) | bit(HI16_ZMM);
/// Components that only come as a group: a guest enables all of them or none.
const GROUPS: [u64; 3] = [bit(FP) | bit(SSE), bit(BNDREGS) | bit(BNDCSR), AVX512];

/// What a vCPU is given of XSAVE after [`normalize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Xsave {
    /// The user components (XCR0 bits) leaf 0xD offers: the vCPU starts with this XCR0.
    pub xcr0: u64,
    /// The supervisor components (IA32_XSS bits) it offers.
    pub xss: u64,
}

impl Xsave {
    /// The vCPU's extended control registers at boot: XCR0 holding every user component
    /// offered, which is what Linux enables. The architectural reset value is x87 alone,
    /// but no guest can see XCR0 before it sets CR4.OSXSAVE, and the sizes KVM reports in
    /// subleaves 0 and 1 follow the vCPU's XCR0 as KVM knows it.
    pub fn start_xcrs(&self) -> kvm_xcrs {
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = self.xcr0;
        xcrs
    }
}

/// The feature flags of leaves 1 and 7 that XSAVE components depend on.
struct Flags {
    xsave: bool,
    avx: bool,
    mpx: bool,
    avx512f: bool,
    pku: bool,
    cet: bool,
}

impl Flags {
    fn of(entries: &[kvm_cpuid_entry2]) -> Self {
        let leaf1 = find(entries, 1, 0).copied().unwrap_or_default();
        let leaf7 = find(entries, 7, 0).copied().unwrap_or_default();
        Flags {
            xsave: leaf1.ecx & ECX1_XSAVE != 0,
            avx: leaf1.ecx & ECX1_AVX != 0,
            mpx: leaf7.ebx & EBX7_MPX != 0,
            avx512f: leaf7.ebx & EBX7_AVX512F != 0,
            pku: leaf7.ecx & ECX7_PKU != 0,
            cet: leaf7.ecx & ECX7_CET_SS != 0 || leaf7.edx & EDX7_CET_IBT != 0,
        }
    }

    /// The user components kiln gives a guest when their flag is offered. AMX tile state
    /// is never among them: it needs a per-process permission kiln does not ask KVM for,
    /// and a snapshot holds a vCPU's XSAVE image in KVM's 4 KiB `kvm_xsave`.
    fn user_components(&self) -> u64 {
        let mut mask = bit(FP) | bit(SSE);
        if self.avx {
            mask |= bit(YMM);
        }
        if self.mpx {
            mask |= bit(BNDREGS) | bit(BNDCSR);
        }
        if self.avx && self.avx512f {
            mask |= AVX512;
        }
        if self.pku {
            mask |= bit(PKRU);
        }
        mask
    }

    /// The supervisor components kiln gives a guest when their flag is offered.
    fn supervisor_components(&self) -> u64 {
        if self.cet {
            bit(CET_USER) | bit(CET_SUPERVISOR)
        } else {
            0
        }
    }
}

/// Rewrites leaf 0xD of `cpuid` (from KVM_GET_SUPPORTED_CPUID) as described in the module
/// documentation. Returns `None`, having removed leaf 0xD, when the table offers no
/// usable XSAVE (no XSAVE flag in leaf 1, or no x87 and SSE state).
pub fn normalize(cpuid: &mut CpuId) -> Result<Option<Xsave>, vmm_sys_util::fam::Error> {
    let entries = cpuid.as_slice();
    let flags = Flags::of(entries);
    let (Some(sub0), Some(sub1)) = (find(entries, LEAF_XSAVE, 0), find(entries, LEAF_XSAVE, 1))
    else {
        return without_leaf(cpuid);
    };
    let (sub0, sub1) = (*sub0, *sub1);

    let offered_user = u64::from(sub0.eax) | u64::from(sub0.edx) << 32;
    let mut xcr0 = whole_groups(offered_user & flags.user_components() & described(entries, false));
    if xcr0 & bit(YMM) == 0 {
        // AVX-512 state extends the AVX registers.
        xcr0 &= !AVX512;
    }
    if !flags.xsave || xcr0 & bit(FP) == 0 {
        return without_leaf(cpuid);
    }

    // No dynamically enabled (XFD) components are offered, so no XFD either.
    let sub1_eax = sub1.eax & !EAX_D1_XFD;
    let xss = if sub1_eax & EAX_D1_XSAVES != 0 {
        let offered_xss = u64::from(sub1.ecx) | u64::from(sub1.edx) << 32;
        offered_xss & flags.supervisor_components() & described(entries, true)
    } else {
        0
    };
    let compacted = sub1_eax & (EAX_D1_XSAVEC | EAX_D1_XSAVES) != 0;

    let mut out = other_leaves(entries);
    let components: Vec<kvm_cpuid_entry2> = (2..64)
        .filter(|&c| (xcr0 | xss) & bit(c) != 0)
        .filter_map(|c| find(entries, LEAF_XSAVE, c).copied())
        .map(|e| kvm_cpuid_entry2 {
            ecx: e.ecx & !ECX_DI_XFD,
            edx: 0,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            ..e
        })
        .collect();
    let standard = standard_size(&components, xcr0);
    let (lo, hi) = split(xcr0);
    out.push(kvm_cpuid_entry2 {
        eax: lo,
        ebx: standard,
        ecx: standard,
        edx: hi,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        ..sub0
    });
    let (xss_lo, xss_hi) = split(xss);
    out.push(kvm_cpuid_entry2 {
        eax: sub1_eax,
        // IA32_XSS starts at 0, so the compacted area holds the XCR0 components.
        ebx: if compacted {
            compacted_size(&components, xcr0)
        } else {
            0
        },
        ecx: xss_lo,
        edx: xss_hi,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        ..sub1
    });
    out.extend(components);
    *cpuid = CpuId::from_entries(&out)?;
    Ok(Some(Xsave { xcr0, xss }))
}

/// Removes leaf 0xD: what a CPU without XSAVE reports.
fn without_leaf(cpuid: &mut CpuId) -> Result<Option<Xsave>, vmm_sys_util::fam::Error> {
    *cpuid = CpuId::from_entries(&other_leaves(cpuid.as_slice()))?;
    Ok(None)
}

fn other_leaves(entries: &[kvm_cpuid_entry2]) -> Vec<kvm_cpuid_entry2> {
    entries
        .iter()
        .filter(|e| e.function != LEAF_XSAVE)
        .copied()
        .collect()
}

/// The components of one kind (user or supervisor) that leaf 0xD describes: x87 and SSE
/// (user state in the legacy region), and each component of 2 and up whose subleaf gives
/// a size and says it is of that kind.
fn described(entries: &[kvm_cpuid_entry2], supervisor: bool) -> u64 {
    let legacy = if supervisor { 0 } else { bit(FP) | bit(SSE) };
    entries
        .iter()
        .filter(|e| e.function == LEAF_XSAVE && (2..64).contains(&e.index))
        .filter(|e| e.eax != 0 && (e.ecx & ECX_DI_SUPERVISOR != 0) == supervisor)
        .fold(legacy, |mask, e| mask | bit(e.index))
}

/// `mask` without the groups it holds only part of.
fn whole_groups(mut mask: u64) -> u64 {
    for group in GROUPS {
        if mask & group != group {
            mask &= !group;
        }
    }
    mask
}

fn split(mask: u64) -> (u32, u32) {
    // Truncation intended: the low and high halves of a 64-bit mask.
    #[allow(clippy::cast_possible_truncation)]
    (mask as u32, (mask >> 32) as u32)
}

/// The standard-format (XSAVE) area for the user components in `mask`: each at the offset
/// its subleaf gives.
fn standard_size(components: &[kvm_cpuid_entry2], mask: u64) -> u32 {
    components
        .iter()
        .filter(|e| mask & bit(e.index) != 0)
        .map(|e| e.ebx + e.eax)
        .fold(LEGACY_AND_HEADER, u32::max)
}

/// The compacted-format (XSAVEC/XSAVES) area for the components in `mask`: each after the
/// previous one, in component order (the order of `components`), aligned to 64 bytes
/// where its subleaf says so.
fn compacted_size(components: &[kvm_cpuid_entry2], mask: u64) -> u32 {
    components
        .iter()
        .filter(|e| mask & bit(e.index) != 0)
        .fold(LEGACY_AND_HEADER, |end, e| {
            let start = if e.ecx & ECX_DI_ALIGN64 != 0 {
                end.next_multiple_of(64)
            } else {
                end
            };
            start + e.eax
        })
}

fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
}

#[cfg(test)]
mod tests;
