//! KVM state owned by the VMM: the VM and its vCPUs.

pub mod vcpu;
pub mod vm;
