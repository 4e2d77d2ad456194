//! virtio devices and the virtio-mmio transport that puts them on the MMIO bus.
//!
//! A concrete device (vsock, block, net, rng) implements [`VirtioDevice`]: it says what
//! it is and what it offers, and once the driver has negotiated features and set up the
//! queues, the transport hands it guest memory, the queues, one notification eventfd per
//! queue and a [`VirtioInterrupt`] in [`VirtioDevice::activate`]. From then on the device
//! works on its own, usually from the VMM's event loop: it waits on the queue eventfds, pops
//! descriptor chains, and raises the interrupt when it has used some.
//!
//! The [`MmioTransport`] owns the register window. Nothing here calls KVM: the VMM registers
//! [`MmioTransport::queue_evts`] as ioeventfds and [`VirtioInterrupt::irq_evt`] as an irqfd.
//!
//! # Wiring a vsock device (what the VMM does)
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
//! use kiln_devices::virtio::vsock::Vsock;
//! use kiln_devices::virtio::{mmio_cmdline_fragment, GuestMemory, MmioTransport, MMIO_WINDOW_SIZE};
//! use kiln_devices::Bus;
//! use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
//!
//! type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;
//! fn wire(mem: GuestMemory, mmio: &mut Bus, mgr: &mut Manager) -> Result<String, Box<dyn std::error::Error>> {
//!     let (base, irq) = (0xd000_0000, 5);
//!     // One object, two roles: virtio device behind the transport, event-loop subscriber.
//!     let vsock = Arc::new(Mutex::new(Vsock::new(3, "/run/kiln/job.vsock")?));
//!     let transport = MmioTransport::new(mem, vsock.clone(), EventFd::new(EFD_NONBLOCK)?)?;
//!     // In the VMM, with KVM:
//!     //   vm.register_irqfd(transport.interrupt().irq_evt(), irq)
//!     //   for (i, evt) in transport.queue_evts().iter().enumerate():
//!     //       vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET), i as u32)
//!     mmio.insert(Arc::new(Mutex::new(transport)), base, MMIO_WINDOW_SIZE)?;
//!     mgr.add_subscriber(vsock);
//!     Ok(mmio_cmdline_fragment(base, irq)) // "virtio_mmio.device=512@0xd0000000:5"
//! }
//! ```

pub(crate) mod activation;
pub mod block;
pub(crate) mod interest;
pub mod mmio;
pub mod net;
mod queue_ops;
pub mod rng;
pub(crate) mod state;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod test_dir;
#[cfg(test)]
pub(crate) mod test_queue;
#[cfg(test)]
pub(crate) mod test_rig;
pub mod vsock;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::{
    mmio_cmdline_fragment, MmioRestoreArgs, MmioTransport, MmioTransportState, MMIO_WINDOW_SIZE,
    QUEUE_NOTIFY_OFFSET,
};
pub use state::{QueueRestoreArgs, QueueRestoreError, QueueSnapshot};

/// The guest memory type devices work on (the VMM's mapping of guest RAM). Its dirty bitmap
/// records every page a device writes, so that a diff snapshot includes device writes
/// (KVM's dirty log sees only the guest's own).
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Feature bit: the device follows virtio 1.x ("modern"). Every kiln device offers it.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: the driver and the device use `used_event`/`avail_event` to suppress
/// notifications.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest has found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: the device is live.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// `InterruptStatus` bit: the device used buffers in a queue.
pub const INTERRUPT_VRING: u32 = 1;
/// `InterruptStatus` bit: the configuration space (or the device status) changed.
pub const INTERRUPT_CONFIG: u32 = 2;

/// `1 << bit` as a feature mask.
pub const fn feature(bit: u32) -> u64 {
    1u64 << bit
}

/// A device's interrupt line together with its interrupt status and config generation.
///
/// The transport and the device share one (cheap clones): the device sets a status bit and
/// writes the irq eventfd; the guest reads `InterruptStatus` and acks through the transport.
#[derive(Debug, Clone)]
pub struct VirtioInterrupt {
    status: Arc<AtomicU32>,
    config_generation: Arc<AtomicU32>,
    irq: Arc<EventFd>,
    /// Set when the device found the driver's rings corrupt; cleared by a reset.
    broken: Arc<AtomicBool>,
}

impl VirtioInterrupt {
    /// An interrupt that raises `irq_evt` (the eventfd the VMM registers as an irqfd).
    pub fn new(irq_evt: EventFd) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            config_generation: Arc::new(AtomicU32::new(0)),
            irq: Arc::new(irq_evt),
            broken: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The irq eventfd, to register with KVM as an irqfd.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq
    }

    /// Tell the guest the device used buffers.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.raise(INTERRUPT_VRING)
    }

    /// Tell the guest the configuration space changed; bumps the config generation.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.raise(INTERRUPT_CONFIG)
    }

    /// The device cannot go on with what the driver gave it (a corrupt ring): from now on
    /// the transport's status register shows DEVICE_NEEDS_RESET, the guest gets a config
    /// interrupt, and the device leaves its queues alone until the driver resets it. Logged
    /// once per breakage.
    pub fn device_broken(&self, why: &str) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            crate::guest_warn!(static, "virtio: the device needs a reset: {why}");
            if let Err(e) = self.signal_config_change() {
                crate::guest_warn!(static, "virtio: cannot raise the config interrupt: {e}");
            }
        }
    }

    /// Whether [`VirtioInterrupt::device_broken`] was called since the last reset.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// True if `queue` must be left alone: the device is marked broken, or the driver's
    /// avail ring is corrupt (its index runs more than a ring ahead of the device's), which
    /// marks it broken. `what` names the queue in the log line. Every device checks this
    /// before walking a queue, so one corrupt ring is reported the same way everywhere.
    pub(crate) fn queue_unusable(&self, queue: &mut Queue, mem: &GuestMemory, what: &str) -> bool {
        use virtio_queue::QueueOwnedT;
        if self.is_broken() {
            return true;
        }
        if let Err(e) = queue.iter(mem) {
            self.device_broken(&format!("{what} queue: {e}"));
            return true;
        }
        false
    }

    fn raise(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.irq.write(1)
    }

    /// The current `InterruptStatus` value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Clear the acknowledged `bits` (a guest write to `InterruptACK`).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// The current config generation.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// Clear the interrupt status and the broken mark (device reset). The generation keeps
    /// counting.
    pub(crate) fn clear(&self) {
        self.status.store(0, Ordering::Release);
        self.broken.store(false, Ordering::Release);
    }

    /// Put back a saved interrupt status and config generation (snapshot restore).
    pub(crate) fn restore(&self, status: u32, config_generation: u32) {
        self.status.store(status, Ordering::Release);
        self.config_generation
            .store(config_generation, Ordering::Release);
    }
}

/// What a device goes live with when the driver sets DRIVER_OK: guest memory, its queues
/// (already validated), one notification eventfd per queue (the guest writes them through
/// `QueueNotify`) and the interrupt to raise when buffers are used.
pub struct Activation {
    pub mem: GuestMemory,
    pub queues: Vec<Queue>,
    pub queue_evts: Vec<EventFd>,
    pub interrupt: VirtioInterrupt,
}

impl Activation {
    pub fn new(
        mem: GuestMemory,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: VirtioInterrupt,
    ) -> Self {
        Self {
            mem,
            queues,
            queue_evts,
            interrupt,
        }
    }

    /// The `N` queues, and their eventfds, that a device with `N` queues activates with;
    /// else the error saying how many the transport handed over.
    pub(crate) fn exact_queues<const N: usize>(
        self,
    ) -> Result<([Queue; N], [EventFd; N], GuestMemory, VirtioInterrupt), ActivateError> {
        let got = self.queues.len().min(self.queue_evts.len());
        match (
            <[Queue; N]>::try_from(self.queues),
            <[EventFd; N]>::try_from(self.queue_evts),
        ) {
            (Ok(queues), Ok(evts)) => Ok((queues, evts, self.mem, self.interrupt)),
            _ => Err(ActivateError::QueueCount { expected: N, got }),
        }
    }
}

/// Why a device could not go live when the driver set DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport handed over a different number of queues than the device has.
    #[error("the device has {expected} queues but {got} were set up")]
    QueueCount {
        /// Queues the device expects.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
    /// The driver did not make a queue ready, or its rings are not in guest memory.
    #[error("virtqueue {index} is not ready or its rings lie outside guest memory")]
    InvalidQueue {
        /// The queue's index.
        index: usize,
    },
    /// Copying an eventfd or waking the event loop failed.
    #[error("device activation failed: {0}")]
    Io(#[from] io::Error),
}

/// What a virtio device implements to sit behind a transport.
///
/// The transport calls these from a vCPU thread with the device's lock held; a device that
/// also runs in the event loop shares its state through the same lock, so it must never take
/// the transport's lock (the transport locks itself first, then the device).
pub trait VirtioDevice: Send {
    /// The virtio device ID (e.g. 19 for vsock).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits the device offers; must include [`VIRTIO_F_VERSION_1`].
    fn device_features(&self) -> u64;

    /// The driver accepted `features` (already checked to be a subset of the offer).
    fn ack_features(&mut self, features: u64);

    /// The device's config space as the driver reads it (little-endian fields). Empty by
    /// default; a device with a config space that is not plain bytes overrides `read_config`.
    fn config_space(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Read `data.len()` bytes of the config space at `offset`; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    /// The driver writes the config space. The default is a read-only config space: kiln's
    /// devices offer no feature that makes a config field writable, so the write is ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        crate::guest_warn!(
            static,
            device_type = self.device_type(),
            offset,
            len = data.len(),
            "virtio: the config space is read-only; write ignored"
        );
    }

    /// The driver set DRIVER_OK: go live with what `activation` holds.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;

    /// The driver wrote 0 to the status: drop the queues, forget the features, go back to
    /// the state before negotiation.
    fn reset(&mut self);
}

/// Copy `config[offset..]` into `data`, filling whatever lies past the end with zeros. The
/// common shape of [`VirtioDevice::read_config`].
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_status_and_ack() {
        let irq = VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let other = irq.clone();
        other.signal_used_queue().unwrap();
        assert_eq!(irq.status(), INTERRUPT_VRING);
        other.signal_config_change().unwrap();
        assert_eq!(irq.status(), INTERRUPT_VRING | INTERRUPT_CONFIG);
        assert_eq!(irq.config_generation(), 1);
        assert_eq!(irq.irq_evt().read().unwrap(), 2);
        irq.ack(INTERRUPT_VRING);
        assert_eq!(other.status(), INTERRUPT_CONFIG);
        irq.clear();
        assert_eq!(other.status(), 0);
    }

    #[test]
    fn config_bytes_are_zero_padded() {
        let cfg = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 9, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut data[..1]);
        assert_eq!(data[0], 0);
    }
}
