//! The kinds of virtio device a VM can have: each as a live device ([`VirtioHandle`]), how
//! its state is saved, and how it is rebuilt from a saved state for a clone. Adding a kind
//! of device adds one variant here and one in [`VirtioState`].

use std::path::Path;
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kiln_devices::virtio::block::Block;
use kiln_devices::virtio::net::{MacAddr, Net, NetRestoreArgs};
use kiln_devices::virtio::rng::Rng;
use kiln_devices::virtio::vsock::{Vsock, VsockRestoreArgs};
use kiln_devices::virtio::{QueueRestoreArgs, VirtioDevice};
use kiln_devices::Persist;

use super::disk::{self, CloneOverlays};
use super::state::VirtioState;
use super::DeviceError;
use crate::snapshot::SnapshotError;

/// A live virtio device, shared with its transport and the event loop.
#[derive(Clone)]
pub enum VirtioHandle {
    Vsock(Arc<Mutex<Vsock>>),
    Block(Arc<Mutex<Block>>),
    Net(Arc<Mutex<Net>>),
    Rng(Arc<Mutex<Rng>>),
}

/// What a clone brings to a restore that its snapshot cannot hold.
pub struct CloneResources<'a> {
    /// The clone's vsock socket (required if the snapshot has a vsock device).
    pub vsock_uds: Option<&'a Path>,
    /// The clone's TAP and MAC (required if the snapshot has a network device).
    pub net: Option<&'a crate::net::NetConfig>,
    /// Where the clone's overlay disks get their copies.
    pub overlays: CloneOverlays<'a>,
}

impl VirtioHandle {
    /// What the device is, for messages (the same word as [`VirtioState::kind`]).
    pub fn kind(&self) -> &'static str {
        match self {
            VirtioHandle::Vsock(_) => "vsock",
            VirtioHandle::Block(_) => "block",
            VirtioHandle::Net(_) => "net",
            VirtioHandle::Rng(_) => "rng",
        }
    }

    /// The device as its transport drives it.
    pub fn as_virtio(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            VirtioHandle::Vsock(d) => d.clone(),
            VirtioHandle::Block(d) => d.clone(),
            VirtioHandle::Net(d) => d.clone(),
            VirtioHandle::Rng(d) => d.clone(),
        }
    }

    /// The device as the event loop drives it (it watches queue and host fds).
    pub fn as_subscriber(&self) -> Arc<Mutex<dyn MutEventSubscriber + Send>> {
        match self {
            VirtioHandle::Vsock(d) => d.clone(),
            VirtioHandle::Block(d) => d.clone(),
            VirtioHandle::Net(d) => d.clone(),
            VirtioHandle::Rng(d) => d.clone(),
        }
    }

    /// The device's state for a snapshot in `dir`; `disk_index` numbers block devices.
    pub fn save(&self, disk_index: usize, dir: &Path) -> Result<VirtioState, SnapshotError> {
        fn lock<'a, D>(
            d: &'a Mutex<D>,
            what: &str,
        ) -> Result<std::sync::MutexGuard<'a, D>, SnapshotError> {
            d.lock()
                .map_err(|_| SnapshotError::NotSnapshottable(format!("{what} is poisoned")))
        }
        Ok(match self {
            VirtioHandle::Vsock(d) => VirtioState::Vsock(lock(d, "vsock")?.save()),
            VirtioHandle::Block(d) => {
                let mut device = lock(d, &format!("disk {disk_index}"))?;
                VirtioState::Block(disk::save(&mut device, disk_index, dir)?)
            }
            VirtioHandle::Net(d) => VirtioState::Net(lock(d, "net")?.save()),
            VirtioHandle::Rng(d) => VirtioState::Rng(lock(d, "rng")?.save()),
        })
    }

    /// The device `saved` describes, rebuilt for a clone around `queues` (memory, queue
    /// eventfds, interrupt) and the clone's own host resources.
    pub fn restore(
        saved: &VirtioState,
        disk_index: usize,
        queues: QueueRestoreArgs,
        clone: &CloneResources,
    ) -> Result<VirtioHandle, DeviceError> {
        Ok(match saved {
            VirtioState::Vsock(state) => {
                let uds = required(clone.vsock_uds, "a vsock device", "--vsock path")?;
                let args = VsockRestoreArgs {
                    uds_path: uds.to_owned(),
                    queues,
                };
                VirtioHandle::Vsock(Arc::new(Mutex::new(Vsock::restore(args, state)?)))
            }
            VirtioState::Block(saved) => {
                let state = disk::clone_state(&clone.overlays, disk_index, saved)?;
                VirtioHandle::Block(Arc::new(Mutex::new(Block::restore(queues, &state)?)))
            }
            VirtioState::Net(state) => {
                let config = required(clone.net, "a network device", "--net tap=NAME")?;
                let args = NetRestoreArgs {
                    tap: crate::net::open_tap(&config.tap)?,
                    mac: config.mac.unwrap_or_else(MacAddr::random),
                    queues,
                };
                VirtioHandle::Net(Arc::new(Mutex::new(Net::restore(args, state)?)))
            }
            VirtioState::Rng(state) => {
                VirtioHandle::Rng(Arc::new(Mutex::new(Rng::restore(queues, state)?)))
            }
        })
    }
}

/// The host resource a clone brings for a device the snapshot has (`device`), or the
/// error asking for one of its own (`flag`).
fn required<T>(given: Option<T>, device: &str, flag: &str) -> Result<T, DeviceError> {
    given.ok_or_else(|| {
        DeviceError::Restore(format!(
            "the snapshot has {device}: give this clone its own {flag}"
        ))
    })
}
