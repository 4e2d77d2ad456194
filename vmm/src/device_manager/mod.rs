//! The VM's devices in one place: the port-I/O and MMIO buses the vCPUs dispatch to, the
//! legacy devices every VM has, and the virtio devices with their transports, each at an
//! MMIO window and interrupt line the manager hands out.
//!
//! A new VM attaches its devices in order ([`DeviceManager::attach`]); a snapshot saves
//! every device with the window and line it sits at ([`DeviceManager::save`]); a restore
//! brings each back at exactly that window and line ([`DeviceManager::restore_virtio`]),
//! whatever order it attaches them in.
//!
//! Devices live in `kiln-devices` and never call KVM; this module creates them, places them
//! on the buses and connects their interrupt and queue eventfds to KVM.

mod disk;
mod legacy;
mod mmio;
mod state;
mod virtio;

pub use disk::{block_device, CloneOverlays};
pub use legacy::{Buses, LegacyDevices};
pub use mmio::{MmioWindow, WindowError, Windows, MAX_DEVICES};
pub use state::{DevicesState, DiskState, VirtioDeviceState, VirtioState};
pub use virtio::{CloneResources, VirtioHandle};

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_devices::virtio::vsock::Vsock;
use kiln_devices::virtio::{
    mmio_cmdline_fragment, MmioRestoreArgs, MmioTransport, QueueRestoreArgs, VirtioInterrupt,
    MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET,
};
use kiln_devices::{BusError, Persist, SharedBusDevice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::GuestMemory;
use crate::snapshot::SnapshotError;
use crate::vstate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot restore device state: {0}")]
    Restore(String),
    #[error("cannot set up a virtio device: {0}")]
    Virtio(String),
    #[error(transparent)]
    Window(#[from] WindowError),
    #[error("the device buses are in use by running vCPUs")]
    BusesInUse,
    #[error("cannot create the vsock device: {0}")]
    Vsock(#[from] kiln_devices::virtio::vsock::VsockError),
    #[error("{0}")]
    Block(#[from] kiln_devices::virtio::block::BlockError),
    #[error("{0}")]
    Net(#[from] kiln_devices::virtio::net::NetError),
    #[error("{0}")]
    Rng(#[from] kiln_devices::virtio::rng::RngError),
}

pub(crate) fn eventfd() -> Result<EventFd, DeviceError> {
    EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)
}

/// A virtio device behind its transport, at its window.
struct VirtioEntry {
    window: MmioWindow,
    transport: Arc<Mutex<MmioTransport>>,
    device: VirtioHandle,
}

/// Every device of one VM.
pub struct DeviceManager {
    /// Shared with the vCPU threads once the VM runs; attaching needs it unshared.
    buses: Arc<Buses>,
    pub(crate) legacy: LegacyDevices,
    /// Kept in window order, which is the order a new VM attached them in.
    virtio: Vec<VirtioEntry>,
    windows: mmio::Windows,
}

impl DeviceManager {
    /// The legacy devices on the port-I/O bus, new or (with `saved`) as a snapshot left
    /// them; with an irqchip, the console's interrupt is wired to its line.
    pub fn new(
        vm: &Vm,
        console: Box<dyn Write + Send>,
        start: Instant,
        irqchip: bool,
        saved: Option<&DevicesState>,
    ) -> Result<Self, DeviceError> {
        let mut buses = Buses::default();
        let legacy = legacy::attach_legacy(
            vm,
            &mut buses,
            console,
            start,
            irqchip,
            saved.map(|s| (&s.serial, s.i8042)),
        )?;
        Ok(DeviceManager {
            buses: Arc::new(buses),
            legacy,
            virtio: Vec::new(),
            windows: mmio::Windows::default(),
        })
    }

    fn buses_mut(&mut self) -> Result<&mut Buses, DeviceError> {
        Arc::get_mut(&mut self.buses).ok_or(DeviceError::BusesInUse)
    }

    /// The buses, for the vCPU threads.
    pub fn buses(&self) -> Arc<Buses> {
        self.buses.clone()
    }

    /// Puts a device of the caller's on the MMIO bus at `base` (tests' own devices).
    pub fn add_mmio(
        &mut self,
        base: u64,
        len: u64,
        device: SharedBusDevice,
    ) -> Result<(), DeviceError> {
        self.buses_mut()?.mmio.insert(device, base, len)?;
        Ok(())
    }

    /// Puts `device` behind a new virtio-mmio transport at the next free window, with its
    /// interrupt wired as an irqfd and its queue notifications as ioeventfds (so a kick
    /// does not exit to kiln). Returns the `virtio_mmio.device=…` fragment for the guest
    /// kernel's command line.
    pub fn attach(
        &mut self,
        vm: &Vm,
        memory: &GuestMemory,
        device: VirtioHandle,
    ) -> Result<String, DeviceError> {
        let window = self.windows.take_next()?;
        let irq_evt = eventfd()?;
        vm.register_irqfd(&irq_evt, window.irq)?;
        let transport = MmioTransport::new(memory.clone(), device.as_virtio(), irq_evt)
            .map_err(|e| DeviceError::Virtio(e.to_string()))?;
        self.place(vm, window, transport, device)?;
        Ok(mmio_cmdline_fragment(window.base, window.irq))
    }

    /// Brings back every virtio device of `saved` at the window and line it was saved at,
    /// with the clone's own host resources.
    pub fn restore_virtio(
        &mut self,
        vm: &Vm,
        memory: &GuestMemory,
        saved: &DevicesState,
        clone: &CloneResources,
    ) -> Result<(), DeviceError> {
        self.restore_in_order(vm, memory, saved, clone, 0..saved.virtio.len())
    }

    /// [`Self::restore_virtio`], attaching the saved devices in `order` (indices into
    /// `saved.virtio`): where a device lands never depends on the order.
    pub(crate) fn restore_in_order(
        &mut self,
        vm: &Vm,
        memory: &GuestMemory,
        saved: &DevicesState,
        clone: &CloneResources,
        order: impl IntoIterator<Item = usize>,
    ) -> Result<(), DeviceError> {
        // Disks are numbered in the saved order (/dev/vda first).
        let mut disk_index = Vec::with_capacity(saved.virtio.len());
        let mut disks = 0;
        for d in &saved.virtio {
            disk_index.push(disks);
            if matches!(d.device, VirtioState::Block(_)) {
                disks += 1;
            }
        }
        for i in order {
            let (Some(state), Some(&disk)) = (saved.virtio.get(i), disk_index.get(i)) else {
                continue;
            };
            self.restore_one(vm, memory, state, disk, clone)
                .map_err(|e| match e {
                    DeviceError::Restore(why) => DeviceError::Restore(format!(
                        "{} device at {:#x}: {why}",
                        state.device.kind(),
                        state.window.base
                    )),
                    e => e,
                })?;
        }
        Ok(())
    }

    fn restore_one(
        &mut self,
        vm: &Vm,
        memory: &GuestMemory,
        saved: &VirtioDeviceState,
        disk_index: usize,
        clone: &CloneResources,
    ) -> Result<(), DeviceError> {
        self.windows.claim(saved.window)?;
        let irq_evt = eventfd()?;
        vm.register_irqfd(&irq_evt, saved.window.irq)?;
        let interrupt = VirtioInterrupt::new(irq_evt);
        // One notification eventfd per queue the transport had (the device's own count).
        let evts = (0..saved.transport.queues.len())
            .map(|_| eventfd())
            .collect::<Result<Vec<_>, _>>()?;
        let clones = evts
            .iter()
            .map(|e| e.try_clone().map_err(DeviceError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        let queues = QueueRestoreArgs {
            mem: memory.clone(),
            queue_evts: clones,
            interrupt: interrupt.clone(),
        };
        let device = VirtioHandle::restore(&saved.device, disk_index, queues, clone)?;
        let args = MmioRestoreArgs {
            mem: memory.clone(),
            device: device.as_virtio(),
            interrupt,
            queue_evts: evts,
        };
        let transport = MmioTransport::restore(args, &saved.transport)
            .map_err(|e| DeviceError::Restore(format!("virtio-mmio transport: {e}")))?;
        self.place(vm, saved.window, transport, device)
    }

    /// Registers the transport's queue notifications with KVM and puts it on the MMIO bus
    /// at `window`.
    fn place(
        &mut self,
        vm: &Vm,
        window: MmioWindow,
        transport: MmioTransport,
        device: VirtioHandle,
    ) -> Result<(), DeviceError> {
        let notify = kvm_ioctls::IoEventAddress::Mmio(window.base + QUEUE_NOTIFY_OFFSET);
        for (index, evt) in transport.queue_evts().iter().enumerate() {
            let datamatch = u32::try_from(index).unwrap_or(u32::MAX);
            vm.fd()
                .register_ioevent(evt, &notify, datamatch)
                .map_err(|e| DeviceError::Virtio(format!("cannot register queue notify: {e}")))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.buses_mut()?.mmio.insert(
            transport.clone() as SharedBusDevice,
            window.base,
            MMIO_WINDOW_SIZE,
        )?;
        let at = self.virtio.partition_point(|e| e.window.base < window.base);
        self.virtio.insert(
            at,
            VirtioEntry {
                window,
                transport,
                device,
            },
        );
        Ok(())
    }

    /// The state of every device, for a snapshot in `dir` (the VM is paused). Overlay
    /// disks are copied into `dir`.
    pub fn save(&self, dir: &Path) -> Result<DevicesState, SnapshotError> {
        let poisoned = |what: &str| SnapshotError::NotSnapshottable(format!("{what} is poisoned"));
        let serial = self.legacy.serial.lock().map_err(|_| poisoned("serial"))?;
        let i8042 = self.legacy.i8042.lock().map_err(|_| poisoned("i8042"))?;
        let mut virtio = Vec::with_capacity(self.virtio.len());
        let mut disks = 0;
        for entry in &self.virtio {
            let device = entry.device.save(disks, dir)?;
            if matches!(device, VirtioState::Block(_)) {
                disks += 1;
            }
            let transport = entry
                .transport
                .lock()
                .map_err(|_| poisoned("a virtio transport"))?
                .save();
            virtio.push(VirtioDeviceState {
                window: entry.window,
                transport,
                device,
            });
        }
        Ok(DevicesState {
            serial: serial.save(),
            i8042: i8042.save(),
            virtio,
        })
    }

    /// The devices the event loop drives (it watches their queue and host fds).
    pub fn subscribers(&self) -> Vec<crate::vmm::Subscriber> {
        self.virtio
            .iter()
            .map(|e| e.device.as_subscriber())
            .collect()
    }

    /// The vsock device, if the VM has one.
    pub fn vsock(&self) -> Option<&Arc<Mutex<Vsock>>> {
        self.virtio.iter().find_map(|e| match &e.device {
            VirtioHandle::Vsock(d) => Some(d),
            _ => None,
        })
    }

    /// Each virtio device's window and kind, in window order.
    pub fn windows(&self) -> Vec<(MmioWindow, &'static str)> {
        self.virtio
            .iter()
            .map(|e| (e.window, e.device.kind()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use kiln_devices::virtio::block::{Block, RawFile};
    use kiln_devices::virtio::rng::Rng;
    use kiln_devices::virtio::vsock::Vsock;

    use super::*;

    /// The virtio-mmio `DeviceID` register of the device at `base`.
    fn device_id(devices: &DeviceManager, base: u64) -> u32 {
        let mut id = [0u8; 4];
        assert!(
            devices.buses().mmio.read(base + 8, &mut id),
            "nothing at {base:#x}"
        );
        u32::from_le_bytes(id)
    }

    /// A VM with an irqchip and its legacy devices, new or from `saved`.
    fn machine(saved: Option<&DevicesState>) -> (GuestMemory, Vm, DeviceManager) {
        let memory = crate::memory::create(16 << 20).unwrap();
        let vm = Vm::new(&memory, 1, false).unwrap();
        vm.create_irqchip().unwrap();
        let sink = Box::new(std::io::sink());
        let devices = DeviceManager::new(&vm, sink, Instant::now(), true, saved).unwrap();
        (memory, vm, devices)
    }

    #[test]
    fn restored_devices_sit_at_their_saved_windows_in_any_attach_order() {
        let dir = crate::test_util::scratch("device-manager");
        let image = dir.join("disk.img");
        std::fs::write(&image, vec![0u8; 4096]).unwrap();

        let (memory, vm, mut devices) = machine(None);
        let vsock = Vsock::new(3, dir.join("v.sock")).unwrap();
        let block = Block::new(RawFile::open(&image, true).unwrap(), b"d").unwrap();
        let rng = Rng::new().unwrap();
        for device in [
            VirtioHandle::Vsock(Arc::new(Mutex::new(vsock))),
            VirtioHandle::Block(Arc::new(Mutex::new(block))),
            VirtioHandle::Rng(Arc::new(Mutex::new(rng))),
        ] {
            devices.attach(&vm, &memory, device).unwrap();
        }
        let saved = devices.save(&dir).unwrap();
        let before = devices.windows();
        assert_eq!(
            before.iter().map(|(_, kind)| *kind).collect::<Vec<_>>(),
            ["vsock", "block", "rng"]
        );
        drop(devices);

        let (memory, vm, mut restored) = machine(Some(&saved));
        let clone = CloneResources {
            vsock_uds: Some(&dir.join("v2.sock")),
            net: None,
            overlays: CloneOverlays {
                snapshot: &dir,
                given: &[],
                scratch: None,
            },
        };
        restored
            .restore_in_order(&vm, &memory, &saved, &clone, [2, 0, 1])
            .unwrap();
        assert_eq!(restored.windows(), before);
        // The guest finds each device where its driver left it: vsock 19, block 2, rng 4.
        for ((window, _), id) in before.iter().zip([19, 2, 4]) {
            assert_eq!(device_id(&restored, window.base), id, "{window:?}");
        }
        // A state that puts two devices at one window is refused.
        let (memory, vm, mut twice) = machine(Some(&saved));
        let err = twice
            .restore_in_order(&vm, &memory, &saved, &clone, [2, 2])
            .unwrap_err();
        assert!(err.to_string().contains("two devices"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
