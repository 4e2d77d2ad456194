//! What a VM is built from: the guest to run, its size, its devices and hooks.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_devices::SharedBusDevice;

use crate::arch::x86_64::regs::CpuMode;

/// What the guest runs.
pub enum BootSource {
    /// A Linux kernel with its initramfs and command line.
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
        /// Write ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) beside the MP table.
        acpi: bool,
        /// List the virtio devices in the DSDT instead of on the command line.
        acpi_devices: bool,
    },
    /// Hand-made guest code, loaded and entered at `load_addr` (used by the direct tests).
    Raw {
        code: Vec<u8>,
        load_addr: u64,
        mode: CpuMode,
    },
}

/// Everything needed to build one VM.
pub struct MachineSpec {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub boot: BootSource,
    /// Receives the guest's serial console output.
    pub console: Box<dyn Write + Send>,
    /// In-kernel PIC/IOAPIC/LAPIC and PIT. Linux needs them; without them HLT exits to kiln,
    /// which the direct tests use to end a hand-made guest.
    pub irqchip: bool,
    /// Extra MMIO devices as (base, length, device): used by tests.
    pub extra_mmio: Vec<(u64, u64, SharedBusDevice)>,
    /// The instant the boot time is measured from (normally the kiln process's start).
    pub start: Instant,
    /// A virtio-vsock device, for the guest agent.
    pub vsock: Option<VsockSpec>,
    /// Take a snapshot here when the guest asks for one (`kiln job --snapshot-at`).
    pub snapshot_on_request: Option<PathBuf>,
    /// Told once when the guest marks boot done (the agent is ready).
    pub boot_done: Option<BootDoneHook>,
    /// Have KVM log the pages the guest writes, so that snapshots can be diffs.
    pub track_dirty_pages: bool,
    /// Confine the VMM's threads with seccomp filters once the VM runs ([`crate::seccomp`]).
    pub seccomp: bool,
    /// virtio-blk disks, /dev/vda first, on MMIO windows after the vsock device's.
    pub disks: Vec<crate::disk::DiskConfig>,
    /// A virtio-net device, on the MMIO window after the disks'.
    pub net: Option<crate::net::NetConfig>,
    /// A virtio-rng device, on the MMIO window after the network device's.
    pub rng: bool,
}

impl MachineSpec {
    /// A VM that runs hand-made guest `code`, loaded at `load_addr` and entered in `mode`:
    /// 1 vCPU, 16 MiB, no irqchip, only the legacy devices, seccomp off (the caller may be
    /// a test whose own thread runs the VM). Change fields with struct update syntax.
    pub fn raw(
        code: Vec<u8>,
        load_addr: u64,
        mode: CpuMode,
        console: Box<dyn Write + Send>,
    ) -> Self {
        MachineSpec {
            vcpus: 1,
            memory_mib: 16,
            boot: BootSource::Raw {
                code,
                load_addr,
                mode,
            },
            console,
            irqchip: false,
            extra_mmio: Vec::new(),
            start: Instant::now(),
            vsock: None,
            snapshot_on_request: None,
            boot_done: None,
            track_dirty_pages: false,
            seccomp: false,
            disks: Vec::new(),
            net: None,
            rng: false,
        }
    }

    /// A Linux VM as `config` describes it (in-kernel irqchip, no vsock, no boot hook).
    pub fn from_config(
        config: &crate::config::VmConfig,
        console: Box<dyn Write + Send>,
        start: Instant,
    ) -> Self {
        MachineSpec {
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            boot: BootSource::Linux {
                kernel: config.kernel.clone(),
                initrd: config.initrd.clone(),
                cmdline: config.cmdline.clone(),
                acpi: config.acpi,
                acpi_devices: config.acpi && config.acpi_devices,
            },
            console,
            irqchip: true,
            extra_mmio: Vec::new(),
            start,
            vsock: None,
            boot_done: None,
            snapshot_on_request: None,
            track_dirty_pages: config.track_dirty_pages,
            seccomp: config.seccomp,
            disks: config.disks.clone(),
            net: config.net.clone(),
            rng: config.rng,
        }
    }
}

/// Called once, on the event loop thread, when the guest marks boot done.
pub type BootDoneHook = Box<dyn FnOnce(Duration) + Send>;

/// The vsock device of a VM.
#[derive(Debug, Clone)]
pub struct VsockSpec {
    /// The guest's context ID (3 or more).
    pub cid: u64,
    /// The Unix socket host clients connect to (`CONNECT <port>`); must not exist yet.
    pub uds_path: PathBuf,
}
