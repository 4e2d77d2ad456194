//! KVM state owned by the VMM: the VM and its vCPUs.

pub mod vcpu;
pub mod vcpu_control;
mod vcpu_signals;
pub mod vcpu_state;
pub mod vm;
