//! The KVM VM: its file descriptor, guest memory slots, in-kernel irqchip and PIT.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory as Memory;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user open /dev/kvm?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM lacks a capability kiln needs: {0}")]
    MissingCap(&'static str),
    #[error("cannot register guest memory with KVM: {0}")]
    SetMemory(kvm_ioctls::Error),
    #[error("this /dev/kvm refuses dirty page logging (KVM_MEM_LOG_DIRTY_PAGES: {0}), so it cannot track the pages a diff snapshot needs; run without --track-dirty-pages (full snapshots still work)")]
    DirtyLogUnsupported(kvm_ioctls::Error),
    #[error("cannot create the in-kernel interrupt controller: {0}")]
    Irqchip(kvm_ioctls::Error),
    #[error("cannot create the in-kernel PIT: {0}")]
    Pit(kvm_ioctls::Error),
    #[error("cannot set the TSS address: {0}")]
    Tss(kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    Cpuid(kvm_ioctls::Error),
    #[error("cannot connect interrupt line {gsi} to an eventfd: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("this KVM supports at most {max} vCPUs; {asked} were asked for")]
    TooManyVcpus { asked: u8, max: usize },
}

/// Where KVM may put the three pages of the real-mode TSS (just below the BIOS area at the
/// top of the 32-bit space, away from RAM and devices).
const TSS_ADDR: usize = 0xfffb_d000;

/// A VM with its memory registered and, optionally, its in-kernel irqchip.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Creates the VM and registers every region of `memory` as a KVM memory slot, slot `i`
    /// for region `i`; with `dirty_log`, KVM logs the pages the guest writes in each.
    pub fn new(memory: &Memory, vcpus: u8, dirty_log: bool) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        let max = kvm.get_max_vcpus();
        if usize::from(vcpus) > max {
            return Err(VmError::TooManyVcpus { asked: vcpus, max });
        }
        for (cap, name) in [
            (kvm_ioctls::Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (kvm_ioctls::Cap::Irqfd, "KVM_CAP_IRQFD"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(TSS_ADDR).map_err(VmError::Tss)?;
        for (slot, region) in memory.iter().enumerate() {
            let mem_region = kvm_userspace_memory_region {
                slot: u32::try_from(slot).unwrap_or(u32::MAX),
                flags: if dirty_log {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of `region.len()` bytes owned by `memory`,
            // which the caller keeps alive for as long as the VM exists (Vmm holds both).
            unsafe { fd.set_user_memory_region(mem_region) }.map_err(if dirty_log {
                VmError::DirtyLogUnsupported
            } else {
                VmError::SetMemory
            })?;
        }
        Ok(Vm { kvm, fd })
    }

    /// The pages of slot `slot` (`len` bytes) the guest wrote since the last call, as KVM's
    /// bitmap (bit `i` is page `i` of the slot). Needs the dirty log (see [`Vm::new`]).
    pub fn take_dirty_log(&self, slot: u32, len: u64) -> Result<Vec<u64>, kvm_ioctls::Error> {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        self.fd.get_dirty_log(slot, len)
    }

    /// Creates the in-kernel PIC/IOAPIC/LAPIC and the PIT. Must come before the vCPUs.
    pub fn create_irqchip(&self) -> Result<(), VmError> {
        self.fd.create_irq_chip().map_err(VmError::Irqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(VmError::Pit)
    }

    /// CPUID entries KVM can give a guest on this host.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::Cpuid)
    }

    /// Makes a write to `event` raise interrupt line `gsi`.
    pub fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(event, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }
}

/// The in-kernel irqchip, PIT and clock of a VM, for a snapshot.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VmState {
    pub pic_master: kvm_bindings::kvm_irqchip,
    pub pic_slave: kvm_bindings::kvm_irqchip,
    pub ioapic: kvm_bindings::kvm_irqchip,
    pub pit: kvm_bindings::kvm_pit_state2,
    pub clock: kvm_bindings::kvm_clock_data,
}

impl Vm {
    /// Reads the irqchip, PIT and clock (the vCPUs must be paused).
    pub fn save_state(&self) -> Result<VmState, kvm_ioctls::Error> {
        let chip = |id| -> Result<kvm_bindings::kvm_irqchip, kvm_ioctls::Error> {
            let mut c = kvm_bindings::kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd.get_irqchip(&mut c)?;
            Ok(c)
        };
        Ok(VmState {
            pic_master: chip(kvm_bindings::KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(kvm_bindings::KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(kvm_bindings::KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2()?,
            clock: self.fd.get_clock()?,
        })
    }

    /// Writes a snapshot's irqchip, PIT and clock into this VM (after `create_irqchip`).
    pub fn restore_state(&self, state: &VmState) -> Result<(), kvm_ioctls::Error> {
        self.fd.set_pit2(&state.pit)?;
        // Only the clock value carries over; the flags describe the old host's clock.
        let clock = kvm_bindings::kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock)?;
        self.fd.set_irqchip(&state.pic_master)?;
        self.fd.set_irqchip(&state.pic_slave)?;
        self.fd.set_irqchip(&state.ioapic)
    }

    /// MSRs KVM can save and restore for a vCPU.
    pub fn msr_index_list(&self) -> Vec<u32> {
        self.kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default()
    }
}
