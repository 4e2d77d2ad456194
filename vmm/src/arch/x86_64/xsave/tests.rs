//! [`normalize`] over supported-CPUID tables as KVM reported them, checked the way Linux
//! checks leaf 0xD at boot.

use super::*;

fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
    let flags = if matches!(function, 4 | 7 | 0xb | 0xd | 0x1f) {
        KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    } else {
        0
    };
    kvm_cpuid_entry2 {
        function,
        index,
        flags,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}

fn table(entries: &[kvm_cpuid_entry2]) -> CpuId {
    CpuId::from_entries(entries).unwrap()
}

fn leaf_d(c: &CpuId) -> Vec<kvm_cpuid_entry2> {
    let mut d: Vec<_> = c
        .as_slice()
        .iter()
        .filter(|e| e.function == LEAF_XSAVE)
        .copied()
        .collect();
    d.sort_by_key(|e| e.index);
    d
}

fn sub(c: &CpuId, index: u32) -> kvm_cpuid_entry2 {
    *find(c.as_slice(), LEAF_XSAVE, index).unwrap_or_else(|| panic!("no subleaf {index}"))
}

/// KVM_GET_SUPPORTED_CPUID in the nested test bed: kvm_amd of Linux 6.12 on QEMU 7.2's
/// TCG `-cpu EPYC,+svm,+npt` (x87, SSE and AVX; XSAVEOPT and XGETBV1, no XSAVEC).
fn testbed_epyc() -> CpuId {
    table(&[
        entry(0, 0, 0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
        entry(1, 0, 0x0080_0f12, 0x0000_0800, 0x76f8_3203, 0x078b_fbfd),
        entry(7, 0, 0, 0x0098_01ab, 0, 0x2000_0000),
        entry(0xd, 0, 0x7, 0x340, 0x340, 0),
        entry(0xd, 1, 0x5, 0, 0, 0),
        entry(0xd, 2, 0x100, 0x240, 0, 0),
    ])
}

/// KVM_GET_SUPPORTED_CPUID of a PVM `/dev/kvm` on an Intel host: leaf 0xD lists AVX and
/// AVX-512 state, while leaf 1 offers neither XSAVE nor AVX and leaf 7 no AVX-512F.
fn pvm_icelake() -> CpuId {
    table(&[
        entry(0, 0, 0x1b, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
        entry(1, 0, 0x0006_06a6, 0x0002_0800, 0x8120_2000, 0x0f8b_fbff),
        entry(7, 0, 0x2, 0x0180_2852, 0x0001_0104, 0x2000_0000),
        entry(0xd, 0, 0xe7, 0xa80, 0xa80, 0),
        entry(0xd, 1, 0, 0, 0, 0),
        entry(0xd, 2, 0x100, 0x240, 0, 0),
        entry(0xd, 5, 0x40, 0x440, 0, 0),
        entry(0xd, 6, 0x200, 0x480, 0, 0),
        entry(0xd, 7, 0x400, 0x680, 0, 0),
    ])
}

/// A Sapphire Rapids host (KVM with CET): AVX-512, PKU, XSAVEC/XSAVES/XFD, CET user and
/// supervisor state in IA32_XSS, and AMX tile state (KVM lists it once the process has
/// asked for guest permission to use it).
fn sapphire_rapids() -> CpuId {
    let leaf1_ecx = ECX1_XSAVE | ECX1_AVX | (1 << 31) | 0x7ffa_3203;
    table(&[
        entry(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
        entry(1, 0, 0x0008_06f8, 0x0000_0800, leaf1_ecx, 0x1f8b_fbff),
        entry(
            7,
            0,
            0x1,
            0xf1bf_07ab | EBX7_AVX512F,
            0x1b40_5f5e | ECX7_PKU | ECX7_CET_SS,
            0xaf01_4010 | EDX7_CET_IBT | (1 << 24),
        ),
        entry(0xd, 0, 0x6_02e7, 0x2b00, 0x2b00, 0),
        entry(0xd, 1, 0x1f, 0x2b18, 0x1800, 0),
        entry(0xd, 2, 0x100, 0x240, 0, 0),
        entry(0xd, 5, 0x40, 0x440, 0, 0),
        entry(0xd, 6, 0x200, 0x480, 0, 0),
        entry(0xd, 7, 0x400, 0x680, 0, 0),
        entry(0xd, 9, 0x8, 0xa80, 0, 0),
        entry(0xd, 11, 0x10, 0, 0x1, 0),
        entry(0xd, 12, 0x18, 0, 0x1, 0),
        entry(0xd, 17, 0x40, 0xac0, 0x2, 0),
        entry(0xd, 18, 0x2000, 0xb00, 0x6, 0),
    ])
}

/// What KVM puts in subleaf 0's EBX for a vCPU whose XCR0 is `xcr0` (it recomputes it on
/// KVM_SET_CPUID2 and on every XCR0 change it sees): the standard-format size.
fn kvm_sub0_ebx(c: &CpuId, xcr0: u64) -> u32 {
    (2..64)
        .filter(|&i| xcr0 & bit(i) != 0)
        .filter_map(|i| find(c.as_slice(), LEAF_XSAVE, i))
        .map(|e| e.ebx + e.eax)
        .fold(LEGACY_AND_HEADER, u32::max)
}

/// The size of Linux's structure for a component, where it checks one.
fn linux_struct_size(component: u32) -> Option<u32> {
    match component {
        YMM => Some(256),
        BNDREGS | BNDCSR | OPMASK => Some(64),
        ZMM_HI256 => Some(512),
        HI16_ZMM => Some(1024),
        PKRU => Some(8),
        CET_USER => Some(16),
        _ => None,
    }
}

/// Linux's boot-time checks of leaf 0xD (`fpu__init_system_xstate`), for a vCPU that KVM
/// runs with `vcpu_xcr0` while the guest enables every user component offered (KVM's
/// subleaf 0 EBX follows `vcpu_xcr0`, as when KVM does not see the guest's XSETBV).
/// Returns what Linux would print "XSAVE consistency problem" about.
fn linux_complaints(c: &CpuId, vcpu_xcr0: u64) -> Vec<String> {
    let entries = c.as_slice();
    let flags = Flags::of(entries);
    let mut problems = Vec::new();
    if !flags.xsave {
        if entries
            .iter()
            .any(|e| e.function == LEAF_XSAVE && e.eax != 0)
        {
            problems.push("leaf 0xD offers state but leaf 1 has no XSAVE".into());
        }
        return problems;
    }
    let sub0 = sub(c, 0);
    let sub1 = sub(c, 1);
    let xcr0 = u64::from(sub0.eax) | u64::from(sub0.edx) << 32;
    let xss = u64::from(sub1.ecx) | u64::from(sub1.edx) << 32;
    let user_needs = flags.user_components();
    for i in (2..64).filter(|&i| xcr0 & bit(i) != 0) {
        if user_needs & bit(i) == 0 {
            problems.push(format!("component {i} offered without its feature flag"));
        }
        let size = find(entries, LEAF_XSAVE, i).map_or(0, |e| e.eax);
        if linux_struct_size(i).is_some_and(|s| s != size) {
            problems.push(format!("component {i}: {size} bytes"));
        }
    }
    if xss != 0 && sub1.eax & EAX_D1_XSAVES == 0 {
        problems.push(format!("supervisor state {xss:#x} without XSAVES"));
    }
    for i in (2..64).filter(|&i| xss & bit(i) != 0) {
        let e = find(entries, LEAF_XSAVE, i).copied().unwrap_or_default();
        if e.eax == 0 || e.ecx & ECX_DI_SUPERVISOR == 0 {
            problems.push(format!("supervisor component {i} not described as one"));
        }
    }
    if xcr0 & (bit(17) | bit(18)) != 0 {
        problems.push("AMX tile state, which needs a permission kiln never asks for".into());
    }
    let linux = kvm_sub0_ebx(c, xcr0);
    let kvm = kvm_sub0_ebx(c, vcpu_xcr0);
    if linux != kvm {
        problems.push(format!("size {linux} != kernel_size {kvm}"));
    }
    problems
}

/// The vCPU's XCR0 after set-up: what kiln sets, else the reset value (x87 only).
fn vcpu_xcr0(x: Option<Xsave>) -> u64 {
    x.map_or(bit(FP), |x| x.xcr0)
}

#[test]
fn testbed_table_as_kvm_gave_it_draws_the_warning() {
    // Without normalization the vCPU starts with XCR0 = x87 and the test bed's KVM never
    // sees the guest's XSETBV: subleaf 0 says 576 bytes, Linux computes 832.
    let c = testbed_epyc();
    assert_eq!(
        linux_complaints(&c, bit(FP)),
        ["size 832 != kernel_size 576"]
    );
}

#[test]
fn testbed_table_keeps_avx_and_starts_the_vcpu_with_it() {
    let mut c = testbed_epyc();
    let x = normalize(&mut c).unwrap();
    assert_eq!(x, Some(Xsave { xcr0: 0x7, xss: 0 }));
    assert!(linux_complaints(&c, vcpu_xcr0(x)).is_empty());
    let s0 = sub(&c, 0);
    assert_eq!((s0.eax, s0.ebx, s0.ecx, s0.edx), (0x7, 0x340, 0x340, 0));
    let s1 = sub(&c, 1);
    assert_eq!((s1.eax, s1.ebx, s1.ecx, s1.edx), (0x5, 0, 0, 0));
    let s2 = sub(&c, 2);
    assert_eq!((s2.eax, s2.ebx, s2.ecx), (0x100, 0x240, 0));
    assert_eq!(leaf_d(&c).len(), 3);
}

#[test]
fn pvm_table_without_xsave_offers_no_xsave_state() {
    let raw = pvm_icelake();
    assert!(!linux_complaints(&raw, bit(FP)).is_empty());
    let mut c = raw;
    assert_eq!(normalize(&mut c).unwrap(), None);
    assert!(leaf_d(&c).is_empty(), "{:?}", leaf_d(&c));
    assert!(linux_complaints(&c, bit(FP)).is_empty());
    // The other leaves are untouched.
    assert_eq!(find(c.as_slice(), 7, 0).unwrap().ebx, 0x0180_2852);
}

#[test]
fn sapphire_rapids_table_loses_amx_and_keeps_the_rest() {
    let raw = sapphire_rapids();
    assert!(!linux_complaints(&raw, bit(FP)).is_empty());
    let mut c = raw;
    let x = normalize(&mut c).unwrap();
    assert_eq!(
        x,
        Some(Xsave {
            xcr0: 0x2e7,
            xss: 0x1800
        })
    );
    assert!(
        linux_complaints(&c, vcpu_xcr0(x)).is_empty(),
        "{:?}",
        linux_complaints(&c, vcpu_xcr0(x))
    );
    let s0 = sub(&c, 0);
    // PKRU ends the standard area: 0xa80 + 8.
    assert_eq!((s0.eax, s0.ebx, s0.ecx, s0.edx), (0x2e7, 0xa88, 0xa88, 0));
    let s1 = sub(&c, 1);
    // XFD goes with AMX; the compacted area packs 576 + 256 + 64 + 512 + 1024 + 8 bytes.
    assert_eq!((s1.eax, s1.ebx, s1.ecx, s1.edx), (0xf, 2440, 0x1800, 0));
    let indices: Vec<u32> = leaf_d(&c).iter().map(|e| e.index).collect();
    assert_eq!(indices, [0, 1, 2, 5, 6, 7, 9, 11, 12]);
    assert_eq!(sub(&c, 12).ecx, ECX_DI_SUPERVISOR);
}

#[test]
fn supervisor_state_needs_xsaves_and_its_flag() {
    // The same host with XSAVES hidden: no IA32_XSS components.
    let mut entries: Vec<kvm_cpuid_entry2> = sapphire_rapids().as_slice().to_vec();
    let sub1 = entries
        .iter_mut()
        .find(|e| e.function == LEAF_XSAVE && e.index == 1)
        .unwrap();
    sub1.eax &= !EAX_D1_XSAVES;
    let mut c = table(&entries);
    let x = normalize(&mut c).unwrap().unwrap();
    assert_eq!(x.xss, 0);
    let s1 = sub(&c, 1);
    assert_eq!((s1.eax, s1.ecx, s1.edx), (0x7, 0, 0));
    assert!(find(c.as_slice(), LEAF_XSAVE, 11).is_none());
    assert!(linux_complaints(&c, x.xcr0).is_empty());

    // With XSAVES but without the CET flags: none either.
    let mut entries: Vec<kvm_cpuid_entry2> = sapphire_rapids().as_slice().to_vec();
    let leaf7 = entries.iter_mut().find(|e| e.function == 7).unwrap();
    leaf7.ecx &= !ECX7_CET_SS;
    leaf7.edx &= !EDX7_CET_IBT;
    let mut c = table(&entries);
    let x = normalize(&mut c).unwrap().unwrap();
    assert_eq!(x.xss, 0);
    assert_eq!(sub(&c, 1).ecx, 0);
    assert!(linux_complaints(&c, x.xcr0).is_empty());
}

#[test]
fn partial_groups_and_undescribed_components_are_dropped() {
    // Leaf 0xD lists AVX-512 state but describes only one of its three components, and
    // PKRU without a subleaf: neither is offered; AVX stays.
    let mut c = table(&[
        entry(1, 0, 0, 0, ECX1_XSAVE | ECX1_AVX, 0),
        entry(7, 0, 0, EBX7_AVX512F, ECX7_PKU, 0),
        entry(0xd, 0, 0x2e7, 0xa88, 0xa88, 0),
        entry(0xd, 1, 0x1, 0, 0, 0),
        entry(0xd, 2, 0x100, 0x240, 0, 0),
        entry(0xd, 5, 0x40, 0x440, 0, 0),
    ]);
    let x = normalize(&mut c).unwrap().unwrap();
    assert_eq!(x.xcr0, 0x7);
    let s0 = sub(&c, 0);
    assert_eq!((s0.eax, s0.ebx, s0.ecx), (0x7, 0x340, 0x340));
    assert!(find(c.as_slice(), LEAF_XSAVE, 5).is_none());
}

#[test]
fn a_table_without_leaf_d_stays_without_it() {
    let mut c = table(&[entry(1, 0, 0, 0, ECX1_XSAVE, 0)]);
    assert_eq!(normalize(&mut c).unwrap(), None);
    assert_eq!(c.as_slice().len(), 1);
}
