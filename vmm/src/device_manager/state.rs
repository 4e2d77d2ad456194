//! What a snapshot carries of the devices: the legacy devices' state, and each virtio
//! device's state with its transport's and the MMIO window and interrupt line it sat at,
//! so that a restore puts every device back where the guest's driver knows it to be.

use kiln_devices::virtio::block::BlockState;
use kiln_devices::virtio::net::NetState;
use kiln_devices::virtio::rng::RngState;
use kiln_devices::virtio::vsock::VsockState;
use kiln_devices::virtio::MmioTransportState;
use kiln_devices::{I8042State, SerialState};
use serde::{Deserialize, Serialize};

use super::mmio::MmioWindow;

/// Every device of a VM, as a snapshot keeps it.
#[derive(Default, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialState,
    pub i8042: I8042State,
    /// The virtio devices in the order they were attached (the disks in /dev/vda order).
    pub virtio: Vec<VirtioDeviceState>,
}

/// One virtio device: where it sat, its transport's registers and its own state.
#[derive(Serialize, Deserialize)]
pub struct VirtioDeviceState {
    pub window: MmioWindow,
    pub transport: MmioTransportState,
    pub device: VirtioState,
}

/// A virtio device's own state; one variant per kind of device kiln has.
#[derive(Serialize, Deserialize)]
pub enum VirtioState {
    Vsock(VsockState),
    Block(DiskState),
    Net(NetState),
    Rng(RngState),
}

/// A block device. The disk's contents are files: a read-only raw image is named by path
/// in `device`; an overlay disk's overlay was copied into the snapshot directory as
/// `overlay_file`, and a restore copies that again for each clone.
#[derive(Clone, Serialize, Deserialize)]
pub struct DiskState {
    pub device: BlockState,
    /// The copy of the overlay in the snapshot directory (a file name in it).
    pub overlay_file: Option<String>,
    /// The image's (base's) modification time when the snapshot was taken, in seconds and
    /// nanoseconds: a restore refuses an image that has changed since.
    pub image_mtime: (i64, i64),
}

impl VirtioState {
    /// What the device is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            VirtioState::Vsock(_) => "vsock",
            VirtioState::Block(_) => "block",
            VirtioState::Net(_) => "net",
            VirtioState::Rng(_) => "rng",
        }
    }
}

impl DevicesState {
    /// The vsock device's state, if the VM had one.
    pub fn vsock(&self) -> Option<&VsockState> {
        self.virtio.iter().find_map(|d| match &d.device {
            VirtioState::Vsock(s) => Some(s),
            _ => None,
        })
    }

    /// The network device's state, if the VM had one.
    pub fn net(&self) -> Option<&NetState> {
        self.virtio.iter().find_map(|d| match &d.device {
            VirtioState::Net(s) => Some(s),
            _ => None,
        })
    }

    /// The disks, /dev/vda first.
    pub fn disks(&self) -> impl Iterator<Item = &DiskState> {
        self.virtio.iter().filter_map(|d| match &d.device {
            VirtioState::Block(s) => Some(s),
            _ => None,
        })
    }

    /// The disks, /dev/vda first, to change (a restore points paths elsewhere).
    pub fn disks_mut(&mut self) -> impl Iterator<Item = &mut DiskState> {
        self.virtio.iter_mut().filter_map(|d| match &mut d.device {
            VirtioState::Block(s) => Some(s),
            _ => None,
        })
    }
}
