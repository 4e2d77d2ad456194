//! The legacy devices every kiln VM has, and the buses vCPU exits are dispatched to.
//!
//! Devices live in `kiln-devices` and never call KVM; this module creates them, puts them
//! on the port-I/O bus and connects their interrupt eventfds to KVM as irqfds.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_devices::serial::{
    SerialConsole, SerialRestoreArgs, COM1_BASE, COM1_IRQ, SERIAL_PORT_LEN,
};
use kiln_devices::{
    BootTimer, Bus, BusError, EventFdTrigger, GuestSignal, I8042RestoreArgs, PanicWatch, Persist,
    SharedBusDevice, GUEST_SIGNAL_BASE, GUEST_SIGNAL_LEN, I8042, I8042_BASE, I8042_PORT_LEN,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vstate::vm::{Vm, VmError};
use kiln_devices::virtio::block::{Block, BlockError, Overlay, RawFile};
use kiln_devices::virtio::net::{MacAddr, Net, NetError, NetRestoreArgs};
use kiln_devices::virtio::rng::Rng;
use kiln_devices::virtio::vsock::{Vsock, VsockRestoreArgs};

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
    #[error("cannot create the vsock device: {0}")]
    Vsock(#[from] kiln_devices::virtio::vsock::VsockError),
    #[error("{0}")]
    Block(#[from] BlockError),
    #[error("{0}")]
    Net(#[from] NetError),
    #[error("{0}")]
    Rng(#[from] kiln_devices::virtio::rng::RngError),
}

/// A virtio-blk device for `disk`: over a new copy-on-write overlay if it names one, else
/// over the image itself (opened read-only for `ro`).
pub fn block_device(disk: &crate::disk::DiskConfig) -> Result<Block, DeviceError> {
    let serial = disk
        .serial
        .clone()
        .unwrap_or_else(|| Block::default_serial(&disk.path));
    let device = match &disk.overlay {
        Some(overlay) => {
            let backend = Overlay::create(&disk.path, overlay).map_err(|e| match e {
                BlockError::Open { path, source } if &path == overlay => DeviceError::Virtio(
                    format!("cannot create overlay {}: {source}", path.display()),
                ),
                e => e.into(),
            })?;
            Block::new(backend, serial.as_bytes())?
        }
        None => Block::new(
            RawFile::open(&disk.path, disk.read_only)?,
            serial.as_bytes(),
        )?,
    };
    Ok(device)
}

/// The port-I/O and MMIO buses the vCPU threads dispatch to.
#[derive(Default)]
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// Handles to the legacy devices that the VMM's main loop watches.
pub struct LegacyDevices {
    pub serial: Arc<Mutex<SerialConsole>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub panic_watch: PanicWatch,
    pub boot_timer: BootTimer,
    /// Written by the i8042 when the guest pulses the reset line.
    pub reset_evt: EventFd,
    /// Written by the guest-signal port when the guest marks boot done.
    pub boot_evt: EventFd,
    /// Written when the guest asks for a snapshot (`kiln job --snapshot-at`).
    pub snapshot_evt: EventFd,
    /// Where the outcome of a guest's snapshot request is reported back to it.
    pub snapshot_requests: kiln_devices::SnapshotRequests,
}

fn eventfd() -> Result<EventFd, DeviceError> {
    EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)
}

/// Creates the serial console, the i8042 and the guest-signal port on `buses.pio`. With an
/// irqchip, the console's interrupt is wired to its GSI.
/// With `restore`, the UART and the i8042 start from a snapshot's state.
pub fn attach_legacy(
    vm: &Vm,
    buses: &mut Buses,
    console: Box<dyn Write + Send>,
    start: Instant,
    with_irqchip: bool,
    restore: Option<(&kiln_devices::SerialState, kiln_devices::I8042State)>,
) -> Result<LegacyDevices, DeviceError> {
    let serial_irq = eventfd()?;
    if with_irqchip {
        vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    }
    let serial_irq = EventFdTrigger::new(serial_irq);
    let serial = match restore {
        Some((state, _)) => {
            let args = SerialRestoreArgs {
                irq: serial_irq,
                out: console,
            };
            SerialConsole::restore(args, state)
                .map_err(|e| DeviceError::Restore(format!("serial console: {e}")))?
        }
        None => SerialConsole::new(serial_irq, console),
    };
    let panic_watch = serial.panic_watch();
    let serial = Arc::new(Mutex::new(serial));
    buses.pio.insert(
        serial.clone() as SharedBusDevice,
        COM1_BASE,
        SERIAL_PORT_LEN,
    )?;

    let reset_evt = eventfd()?;
    let i8042_evt = reset_evt.try_clone().map_err(DeviceError::EventFd)?;
    let i8042 = Arc::new(Mutex::new(match restore {
        Some((_, state)) => {
            let Ok(i8042) = I8042::restore(
                I8042RestoreArgs {
                    reset_evt: i8042_evt,
                },
                &state,
            );
            i8042
        }
        None => I8042::new(i8042_evt),
    }));
    buses
        .pio
        .insert(i8042.clone() as SharedBusDevice, I8042_BASE, I8042_PORT_LEN)?;

    let boot_evt = eventfd()?;
    let snapshot_evt = eventfd()?;
    let (signal, snapshot_requests) =
        GuestSignal::new(start, boot_evt.try_clone().map_err(DeviceError::EventFd)?)
            .with_snapshot_requests(snapshot_evt.try_clone().map_err(DeviceError::EventFd)?);
    let boot_timer = signal.boot_timer();
    buses.pio.insert(
        Arc::new(Mutex::new(signal)),
        GUEST_SIGNAL_BASE,
        GUEST_SIGNAL_LEN,
    )?;

    Ok(LegacyDevices {
        serial,
        i8042,
        panic_watch,
        boot_timer,
        reset_evt,
        boot_evt,
        snapshot_evt,
        snapshot_requests,
    })
}

/// Where the first virtio-mmio device's register window goes, and the stride between them.
const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// IOAPIC pins for virtio-mmio devices start here (4 is the console, 1/12 are PS/2).
const VIRTIO_IRQ_BASE: u32 = 5;

/// A virtio device on the MMIO bus.
pub struct VirtioSlot {
    /// `virtio_mmio.device=…` for the guest kernel.
    pub cmdline: String,
    /// The transport, for snapshots.
    pub transport: Arc<Mutex<kiln_devices::virtio::MmioTransport>>,
}

/// Hands out MMIO windows and interrupt lines to virtio devices, in order.
#[derive(Default)]
pub struct VirtioAllocator {
    next: u32,
}

impl VirtioAllocator {
    /// Puts `device` behind a new virtio-mmio transport on `buses.mmio`, with its
    /// interrupt wired as an irqfd and its queue notifications as ioeventfds (so a notify
    /// does not exit to kiln).
    pub fn attach(
        &mut self,
        vm: &Vm,
        buses: &mut Buses,
        memory: &crate::memory::GuestMemory,
        device: Arc<Mutex<dyn kiln_devices::virtio::VirtioDevice>>,
    ) -> Result<VirtioSlot, DeviceError> {
        let (base, irq) = self.next_window();
        let irq_evt = eventfd()?;
        vm.register_irqfd(&irq_evt, irq)?;
        let transport = kiln_devices::virtio::MmioTransport::new(memory.clone(), device, irq_evt)
            .map_err(|e| DeviceError::Virtio(e.to_string()))?;
        self.wire(vm, buses, transport, base, irq)
    }

    /// Brings back a snapshot's vsock device and transport at the same window.
    pub fn attach_restored_vsock(
        &mut self,
        vm: &Vm,
        buses: &mut Buses,
        memory: &crate::memory::GuestMemory,
        uds_path: &std::path::Path,
        snapshot: &crate::snapshot::VsockSnapshot,
    ) -> Result<(VirtioSlot, Arc<Mutex<Vsock>>), DeviceError> {
        self.attach_restored(vm, buses, memory, 3, &snapshot.transport, |queues| {
            let args = VsockRestoreArgs {
                uds_path: uds_path.to_owned(),
                queues,
            };
            Ok(Vsock::restore(args, &snapshot.device)?)
        })
    }

    /// Brings back a snapshot's block device and transport at the next window; `state`
    /// names the files to open (the caller points its overlay at the clone's own copy).
    pub fn attach_restored_block(
        &mut self,
        vm: &Vm,
        buses: &mut Buses,
        memory: &crate::memory::GuestMemory,
        state: &kiln_devices::virtio::block::BlockState,
        transport: &kiln_devices::virtio::MmioTransportState,
    ) -> Result<(VirtioSlot, Arc<Mutex<Block>>), DeviceError> {
        self.attach_restored(vm, buses, memory, 1, transport, |queues| {
            Block::restore(queues, state).map_err(DeviceError::from)
        })
    }

    /// Brings back a snapshot's network device and transport at the next window, attached
    /// to the clone's own TAP, with the clone's MAC (given, else a new random one).
    pub fn attach_restored_net(
        &mut self,
        vm: &Vm,
        buses: &mut Buses,
        memory: &crate::memory::GuestMemory,
        config: &crate::net::NetConfig,
        snapshot: &crate::snapshot::NetSnapshot,
    ) -> Result<(VirtioSlot, Arc<Mutex<Net>>), DeviceError> {
        let tap = crate::net::open_tap(&config.tap)?;
        let mac = config.mac.unwrap_or_else(MacAddr::random);
        self.attach_restored(vm, buses, memory, 2, &snapshot.transport, |queues| {
            let args = NetRestoreArgs { tap, mac, queues };
            Ok(Net::restore(args, &snapshot.device)?)
        })
    }

    /// Brings back a snapshot's entropy device and transport at the next window.
    pub fn attach_restored_rng(
        &mut self,
        vm: &Vm,
        buses: &mut Buses,
        memory: &crate::memory::GuestMemory,
        snapshot: &crate::snapshot::RngSnapshot,
    ) -> Result<(VirtioSlot, Arc<Mutex<Rng>>), DeviceError> {
        self.attach_restored(vm, buses, memory, 1, &snapshot.transport, |queues| {
            Ok(Rng::restore(queues, &snapshot.device)?)
        })
    }

    /// A restored device `make` builds around the transport's memory, queue eventfds
    /// (clones) and interrupt, behind a transport restored from `transport`, at the next
    /// window.
    fn attach_restored<D: kiln_devices::virtio::VirtioDevice + 'static>(
        &mut self,
        vm: &Vm,
        buses: &mut Buses,
        memory: &crate::memory::GuestMemory,
        queues: usize,
        transport: &kiln_devices::virtio::MmioTransportState,
        make: impl FnOnce(kiln_devices::virtio::QueueRestoreArgs) -> Result<D, DeviceError>,
    ) -> Result<(VirtioSlot, Arc<Mutex<D>>), DeviceError> {
        use kiln_devices::virtio::{MmioRestoreArgs, MmioTransport, VirtioInterrupt};
        let (base, irq) = self.next_window();
        let irq_evt = eventfd()?;
        vm.register_irqfd(&irq_evt, irq)?;
        let interrupt = VirtioInterrupt::new(irq_evt);
        let evts = (0..queues)
            .map(|_| eventfd())
            .collect::<Result<Vec<_>, _>>()?;
        let clones = evts
            .iter()
            .map(|e| e.try_clone().map_err(DeviceError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        let device = Arc::new(Mutex::new(make(kiln_devices::virtio::QueueRestoreArgs {
            mem: memory.clone(),
            queue_evts: clones,
            interrupt: interrupt.clone(),
        })?));
        let args = MmioRestoreArgs {
            mem: memory.clone(),
            device: device.clone(),
            interrupt,
            queue_evts: evts,
        };
        let transport = MmioTransport::restore(args, transport)
            .map_err(|e| DeviceError::Restore(format!("virtio-mmio transport: {e}")))?;
        Ok((self.wire(vm, buses, transport, base, irq)?, device))
    }

    fn next_window(&mut self) -> (u64, u32) {
        let base = crate::arch::x86_64::layout::MMIO_DEVICES_START
            + u64::from(self.next) * VIRTIO_MMIO_STRIDE;
        let irq = VIRTIO_IRQ_BASE + self.next;
        self.next += 1;
        (base, irq)
    }

    fn wire(
        &self,
        vm: &Vm,
        buses: &mut Buses,
        transport: kiln_devices::virtio::MmioTransport,
        base: u64,
        irq: u32,
    ) -> Result<VirtioSlot, DeviceError> {
        use kiln_devices::virtio::{mmio_cmdline_fragment, MMIO_WINDOW_SIZE};
        for (index, evt) in transport.queue_evts().iter().enumerate() {
            let notify = kvm_ioctls::IoEventAddress::Mmio(base + 0x50);
            let datamatch = u32::try_from(index).unwrap_or(u32::MAX);
            vm.fd()
                .register_ioevent(evt, &notify, datamatch)
                .map_err(|e| DeviceError::Virtio(format!("cannot register queue notify: {e}")))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        buses
            .mmio
            .insert(transport.clone() as SharedBusDevice, base, MMIO_WINDOW_SIZE)?;
        Ok(VirtioSlot {
            cmdline: mmio_cmdline_fragment(base, irq),
            transport,
        })
    }
}
