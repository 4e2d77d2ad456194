//! kiln: a microVM monitor for CI jobs.
//!
//! Read top-down: [`config`] says what to boot, [`vmm`] builds and runs it from
//! [`memory`], [`vstate`] (KVM VM and vCPUs), [`boot`] (kernel loading) and
//! [`device_manager`] (every device, saved and restored at its place);
//! once it runs, [`seccomp`] confines each of its threads.

pub mod api;
pub mod arch;
pub mod boot;
pub mod civil;
pub mod cli;
pub mod commands;
pub mod config;
pub mod defaults;
pub mod device_manager;
pub mod disk;
pub mod image;
pub mod jail;
pub mod logcap;
pub mod memory;
pub mod net;
pub mod registry;
pub mod seccomp;
pub mod slot;
pub mod snapshot;
#[cfg(test)]
mod test_util;
pub mod vmm;
pub mod vstate;
