//! The nested test bed and what end-to-end tests build their images with.
pub mod kernels;
pub mod net_download;

pub mod artifacts;
pub mod busybox;
pub mod compress;
pub mod cpio;
mod direct;
pub mod distro_kernel;
pub mod ext4;
pub mod gitlab_harness;
pub mod guest_initramfs;
pub mod host_tools;
pub mod images;
mod nested;
pub mod output;
pub mod process;
pub mod pty;
pub mod qemu;
pub mod registry;
pub mod shell;
pub mod soak;
pub mod testbed;
pub mod tiny_kernel;
pub mod tmp;
pub mod workload;

pub use nested::{INCIDENT_LOG_ENV, TESTBED_CMDLINE};
pub use testbed::{RunOutput, Runner, Testbed};
