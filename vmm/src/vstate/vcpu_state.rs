//! What a snapshot keeps of a vCPU, and the order KVM needs to get and set it in.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// Every register and piece of local state of one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    /// `None` without an in-kernel irqchip.
    pub lapic: Option<kvm_lapic_state>,
    pub mp_state: kvm_mp_state,
    pub vcpu_events: kvm_vcpu_events,
}

#[derive(Debug, thiserror::Error)]
#[error("vCPU {index}: cannot {action} {what}: {source}")]
pub struct VcpuStateError {
    pub index: u8,
    pub action: &'static str,
    pub what: &'static str,
    pub source: kvm_ioctls::Error,
}

/// MSRs worth saving: the ones KVM lists, less those this host's KVM refuses to read.
pub fn saveable_msrs(fd: &VcpuFd, listed: &[u32]) -> Vec<u32> {
    listed
        .iter()
        .copied()
        .filter(|&index| {
            let Ok(mut one) = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }]) else {
                return false;
            };
            matches!(fd.get_msrs(&mut one), Ok(1))
        })
        .collect()
}

/// Reads the state of the vCPU behind `fd` (it must not be running).
pub fn save(
    fd: &VcpuFd,
    index: u8,
    msr_indices: &[u32],
    irqchip: bool,
) -> Result<VcpuState, VcpuStateError> {
    let err = |what| {
        move |source| VcpuStateError {
            index,
            action: "read",
            what,
            source,
        }
    };
    // The MP state first: getting it makes KVM settle a pending INIT/SIPI.
    let mp_state = fd.get_mp_state().map_err(err("mp_state"))?;
    let regs = fd.get_regs().map_err(err("regs"))?;
    let sregs = fd.get_sregs().map_err(err("sregs"))?;
    let xsave = fd.get_xsave().map_err(err("xsave"))?;
    let xcrs = fd.get_xcrs().map_err(err("xcrs"))?;
    let debugregs = fd.get_debug_regs().map_err(err("debugregs"))?;
    let lapic = if irqchip {
        Some(fd.get_lapic().map_err(err("lapic"))?)
    } else {
        None
    };
    let entries: Vec<kvm_msr_entry> = msr_indices
        .iter()
        .map(|&i| kvm_msr_entry {
            index: i,
            ..Default::default()
        })
        .collect();
    // KVM stops at the first MSR it cannot read. Skip that one (logging it) and read on:
    // stopping there would silently drop every MSR after it (the TSC deadline and the
    // kvmclock MSRs among them), and a restored guest would wait for timers that never
    // fire.
    let mut saved = Vec::with_capacity(entries.len());
    let mut rest: &[kvm_msr_entry] = &entries;
    while !rest.is_empty() {
        let mut chunk = Msrs::from_entries(rest).map_err(|_| VcpuStateError {
            index,
            action: "read",
            what: "msrs",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let read = fd.get_msrs(&mut chunk).map_err(err("msrs"))?;
        saved.extend_from_slice(&chunk.as_slice()[..read]);
        if let Some(refused) = rest.get(read) {
            tracing::warn!(
                "vCPU {index}: KVM would not read MSR {:#x}; it is not saved",
                refused.index
            );
        }
        rest = rest.get(read + 1..).unwrap_or(&[]);
    }
    let msrs = saved;
    let vcpu_events = fd.get_vcpu_events().map_err(err("vcpu events"))?;
    let cpuid = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(err("cpuid"))?
        .as_slice()
        .to_vec();
    Ok(VcpuState {
        index,
        cpuid,
        msrs,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        mp_state,
        vcpu_events,
    })
}

/// Writes `state` into the freshly created vCPU behind `fd`, in the order KVM needs: CPUID
/// before anything that depends on the features it names, special registers before the
/// MSRs whose validity they decide, LAPIC before the events that may inject into it.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), VcpuStateError> {
    let index = state.index;
    let err = |what| {
        move |source| VcpuStateError {
            index,
            action: "restore",
            what,
            source,
        }
    };
    let bad_size = |what| VcpuStateError {
        index,
        action: "restore",
        what,
        source: kvm_ioctls::Error::new(libc::E2BIG),
    };
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| bad_size("cpuid"))?;
    fd.set_cpuid2(&cpuid).map_err(err("cpuid"))?;
    fd.set_mp_state(state.mp_state).map_err(err("mp_state"))?;
    fd.set_regs(&state.regs).map_err(err("regs"))?;
    fd.set_sregs(&sregs_for_restore(state))
        .map_err(err("sregs"))?;
    // SAFETY: kiln never asks KVM for guest permission to use dynamically enabled XSAVE
    // features (AMX tile data), so the guest's XSAVE area fits in the 4 KiB `kvm_xsave`
    // and KVM reads nothing past it.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(err("xsave"))?;
    fd.set_xcrs(&state.xcrs).map_err(err("xcrs"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(err("debugregs"))?;
    if let Some(lapic) = &state.lapic {
        fd.set_lapic(lapic).map_err(err("lapic"))?;
    }
    // KVM stops at the first MSR it refuses; skip that one (logging it) and go on, so one
    // MSR this host cannot take back does not sink the restore.
    let mut rest: &[kvm_msr_entry] = &state.msrs;
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest).map_err(|_| bad_size("msrs"))?;
        let written = fd.set_msrs(&msrs).map_err(err("msrs"))?;
        if let Some(refused) = rest.get(written) {
            tracing::warn!(
                "vCPU {index}: KVM refused MSR {:#x} = {:#x}; skipped",
                refused.index,
                refused.data
            );
        }
        rest = rest.get(written + 1..).unwrap_or(&[]);
    }
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(err("vcpu events"))?;
    Ok(())
}

/// The special registers to restore. On AMD, KVM reports the task register as a busy TSS
/// (type 11) although the VMCB holds it as available (type 9): KVM sets the busy bit for
/// Intel's VM-entry checks. Writing type 11 back into a VMCB is harmless to AMD hardware,
/// but an emulated SVM CPU (QEMU TCG, the test bed) then refuses every I/O-bitmap check:
/// user-space port I/O that `ioperm` allowed (the guest's `kiln-snapshot`) faults after a
/// restore. So on AMD the task register goes back as the VMCB itself keeps it.
fn sregs_for_restore(state: &VcpuState) -> kvm_sregs {
    let mut sregs = state.sregs;
    if cpuid_vendor_is_amd(&state.cpuid) && sregs.tr.type_ == TSS_BUSY {
        sregs.tr.type_ = TSS_AVAILABLE;
    }
    sregs
}

/// 64-bit TSS descriptor types.
const TSS_AVAILABLE: u8 = 9;
const TSS_BUSY: u8 = 11;

/// Whether CPUID leaf 0 names an AMD (or Hygon, which is SVM too) processor.
fn cpuid_vendor_is_amd(cpuid: &[kvm_cpuid_entry2]) -> bool {
    cpuid
        .iter()
        .find(|e| e.function == 0 && e.index == 0)
        .is_some_and(|e| {
            let vendor: Vec<u8> = [e.ebx, e.edx, e.ecx]
                .iter()
                .flat_map(|r| r.to_le_bytes())
                .collect();
            vendor == b"AuthenticAMD" || vendor == b"HygonGenuine"
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf0(vendor: &[u8; 12]) -> kvm_cpuid_entry2 {
        let reg = |i: usize| u32::from_le_bytes(vendor[i..i + 4].try_into().unwrap());
        kvm_cpuid_entry2 {
            function: 0,
            ebx: reg(0),
            edx: reg(4),
            ecx: reg(8),
            ..Default::default()
        }
    }

    fn state(vendor: &[u8; 12], tr_type: u8) -> VcpuState {
        let mut sregs = kvm_sregs::default();
        sregs.tr.type_ = tr_type;
        VcpuState {
            index: 0,
            cpuid: vec![leaf0(vendor)],
            mp_state: kvm_mp_state::default(),
            regs: kvm_regs::default(),
            sregs,
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic: None,
            msrs: Vec::new(),
            vcpu_events: kvm_vcpu_events::default(),
        }
    }

    #[test]
    fn amd_task_register_goes_back_available_intel_unchanged() {
        assert_eq!(sregs_for_restore(&state(b"AuthenticAMD", 11)).tr.type_, 9);
        assert_eq!(sregs_for_restore(&state(b"HygonGenuine", 11)).tr.type_, 9);
        // Intel's VM entry requires a busy TSS: left as KVM reported it.
        assert_eq!(sregs_for_restore(&state(b"GenuineIntel", 11)).tr.type_, 11);
        // Anything else (a 16-bit TSS, a hand-made guest without one) is left alone.
        assert_eq!(sregs_for_restore(&state(b"AuthenticAMD", 3)).tr.type_, 3);
    }
}
