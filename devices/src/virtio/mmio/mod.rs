//! The virtio-mmio transport, version 2 ("modern", virtio 1.x section 4.2).
//!
//! One [`MmioTransport`] owns a [`MMIO_WINDOW_SIZE`]-byte register window on the MMIO bus and
//! drives one [`VirtioDevice`]: feature negotiation, queue set-up, the device status state
//! machine, interrupt status and acknowledgement, and the config space at 0x100.
//!
//! The guest cannot break it: every out-of-protocol access (a register write in the wrong
//! state, a feature the device did not offer, a queue outside guest memory, a misaligned or
//! oddly sized register access) is ignored with a log line (rate-limited per device: [`WarnLimiter`]), or refused through the status
//! register the way the spec says, and never panics.
//!
//! Queue notifications: the transport owns one eventfd per queue. The VMM registers each as
//! an ioeventfd on `base +` [`QUEUE_NOTIFY_OFFSET`] with the queue index as datamatch, so a guest kick goes
//! straight to the device's event loop; a `QueueNotify` write that reaches the transport
//! anyway writes the same eventfd.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tracing::debug;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{feature, status, GuestMemory, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use crate::guest_warn;
use crate::guest_warn::WarnLimiter;

pub use state::{MmioRestoreArgs, MmioTransportState, MMIO_STATE_VERSION};

/// Size of one device's register window (registers + config space).
pub const MMIO_WINDOW_SIZE: u64 = 0x200;

/// "virt" in little-endian: the value of the `MagicValue` register.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The transport version: 2 is virtio 1.x.
pub const MMIO_VERSION: u32 = 2;
/// `VendorID`: "kiln" in little-endian.
pub const MMIO_VENDOR_ID: u32 = u32::from_le_bytes(*b"kiln");

mod regs;
use regs::{high, low, reg, set_high, set_low};

/// The offset of `QueueNotify` in the window: the VMM registers an ioeventfd there per
/// queue (datamatch: the queue index), so that a kick does not exit to the VMM.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// The kernel command-line fragment that announces a virtio-mmio device at `base` with
/// interrupt `irq`, e.g. `virtio_mmio.device=512@0xd0000000:5`. Needs a guest kernel with
/// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`.
pub fn mmio_cmdline_fragment(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device={MMIO_WINDOW_SIZE}@{base:#x}:{irq}")
}

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The device declared a queue size virtio does not allow.
    #[error("virtqueue {index} has maximum size {size}; it must be a power of two in 1..=32768")]
    QueueSize {
        /// The queue's index.
        index: usize,
        /// The declared maximum.
        size: u16,
    },
    /// The device does not offer VIRTIO_F_VERSION_1, which this transport requires.
    #[error(
        "device type {0} does not offer VIRTIO_F_VERSION_1; the MMIO transport is modern only"
    )]
    NotModern(u32),
    /// Creating a queue eventfd failed.
    #[error("cannot create a queue notification eventfd: {0}")]
    EventFd(#[from] std::io::Error),
    /// A state to restore came from an incompatible format.
    #[error("virtio-mmio state has format version {found}; this kiln reads version {expected}")]
    StateVersion {
        /// The version in the state.
        found: u32,
        /// The version this build understands.
        expected: u32,
    },
    /// A state to restore does not fit the device.
    #[error("virtio-mmio state is corrupt or for another device: {0}")]
    BadState(String),
    /// A state to restore holds a queue that cannot exist.
    #[error("virtio-mmio state is corrupt: {0}")]
    BadQueue(#[from] crate::virtio::QueueRestoreError),
}

/// A virtio device behind the MMIO register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    interrupt: VirtioInterrupt,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_type: u32,
    device_features: u64,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    status: u32,
    /// Rate limit for the warnings this window's guest accesses can trigger.
    warns: WarnLimiter,
}

impl MmioTransport {
    /// Put `device` behind a register window. `irq_evt` is the eventfd the VMM registers as
    /// the irqfd of the window's interrupt line.
    pub fn new(
        mem: GuestMemory,
        device: Arc<Mutex<dyn VirtioDevice>>,
        irq_evt: EventFd,
    ) -> Result<Self, MmioError> {
        let count = lock(&device).queue_max_sizes().len();
        let queue_evts = (0..count)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        Self::with_parts(mem, device, VirtioInterrupt::new(irq_evt), queue_evts)
    }

    /// A transport in the reset state around an existing interrupt and queue eventfds
    /// (one per queue of the device).
    fn with_parts(
        mem: GuestMemory,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: VirtioInterrupt,
        queue_evts: Vec<EventFd>,
    ) -> Result<Self, MmioError> {
        let (device_type, device_features, max_sizes) = {
            let dev = lock(&device);
            (
                dev.device_type(),
                dev.device_features(),
                dev.queue_max_sizes().to_vec(),
            )
        };
        if device_features & feature(VIRTIO_F_VERSION_1) == 0 {
            return Err(MmioError::NotModern(device_type));
        }
        if queue_evts.len() != max_sizes.len() {
            return Err(MmioError::BadState(format!(
                "{} queue eventfds for {} queues",
                queue_evts.len(),
                max_sizes.len()
            )));
        }
        let queues = max_sizes
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|_| MmioError::QueueSize { index, size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            queue_evts,
            device_type,
            device_features,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            warns: WarnLimiter::new(),
        })
    }

    /// One eventfd per queue, in queue order: register eventfd `i` as an ioeventfd on
    /// `base +` [`QUEUE_NOTIFY_OFFSET`] (4 bytes) with datamatch `i`.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt; register [`VirtioInterrupt::irq_evt`] as an irqfd.
    pub fn interrupt(&self) -> &VirtioInterrupt {
        &self.interrupt
    }

    /// The device behind the window.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The current device status register.
    pub fn device_status(&self) -> u32 {
        self.status
    }

    fn has(&self, bits: u32) -> bool {
        self.status & bits == bits
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => MMIO_VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => low(self.device_features),
                1 => high(self.device_features),
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_NUM => queue.map_or(0, |q| u32::from(q.size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::QUEUE_DESC_LOW => queue.map_or(0, |q| low(q.desc_table())),
            reg::QUEUE_DESC_HIGH => queue.map_or(0, |q| high(q.desc_table())),
            reg::QUEUE_DRIVER_LOW => queue.map_or(0, |q| low(q.avail_ring())),
            reg::QUEUE_DRIVER_HIGH => queue.map_or(0, |q| high(q.avail_ring())),
            reg::QUEUE_DEVICE_LOW => queue.map_or(0, |q| low(q.used_ring())),
            reg::QUEUE_DEVICE_HIGH => queue.map_or(0, |q| high(q.used_ring())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS if self.interrupt.is_broken() => self.status | status::DEVICE_NEEDS_RESET,
            reg::STATUS => self.status,
            // No shared memory regions: a length of all ones says "no such region".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                debug!(
                    offset,
                    "virtio-mmio: read of a write-only or unknown register"
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, value),
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            _ => guest_warn!(
                self.warns,
                offset,
                value,
                "virtio-mmio: write to a read-only or unknown register ignored"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if !self.has(status::DRIVER) || self.has(status::FEATURES_OK) {
            guest_warn!(
                self.warns,
                status = self.status,
                "virtio-mmio: DriverFeatures written outside negotiation; ignored"
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            sel if value != 0 => {
                guest_warn!(
                    self.warns,
                    sel,
                    value,
                    "virtio-mmio: driver accepts features in an unknown word; ignored"
                )
            }
            _ => {}
        }
    }

    fn write_queue_reg(&mut self, offset: u64, value: u32) {
        if !self.has(status::FEATURES_OK) || self.has(status::DRIVER_OK) {
            guest_warn!(
                self.warns,
                offset,
                status = self.status,
                "virtio-mmio: queue register written outside queue set-up; ignored"
            );
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            guest_warn!(
                self.warns,
                sel,
                "virtio-mmio: queue register written for a queue that does not exist"
            );
            return;
        };
        let result = match offset {
            reg::QUEUE_NUM => match u16::try_from(value) {
                Ok(size) => q.try_set_size(size),
                Err(_) => Err(virtio_queue::Error::InvalidSize),
            },
            reg::QUEUE_READY => {
                q.set_ready(value == 1);
                Ok(())
            }
            reg::QUEUE_DESC_LOW => q.try_set_desc_table_address(set_low(q.desc_table(), value)),
            reg::QUEUE_DESC_HIGH => q.try_set_desc_table_address(set_high(q.desc_table(), value)),
            reg::QUEUE_DRIVER_LOW => q.try_set_avail_ring_address(set_low(q.avail_ring(), value)),
            reg::QUEUE_DRIVER_HIGH => q.try_set_avail_ring_address(set_high(q.avail_ring(), value)),
            reg::QUEUE_DEVICE_LOW => q.try_set_used_ring_address(set_low(q.used_ring(), value)),
            reg::QUEUE_DEVICE_HIGH => q.try_set_used_ring_address(set_high(q.used_ring(), value)),
            _ => Ok(()),
        };
        if let Err(e) = result {
            guest_warn!(
                self.warns,
                sel,
                offset,
                value,
                "virtio-mmio: bad queue setting ignored: {e}"
            );
        }
    }

    fn notify(&mut self, value: u32) {
        match self.queue_evts.get(value as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    guest_warn!(
                        self.warns,
                        queue = value,
                        "virtio-mmio: cannot signal queue notification: {e}"
                    );
                }
            }
            None => guest_warn!(
                self.warns,
                queue = value,
                "virtio-mmio: notification for a queue that does not exist"
            ),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            guest_warn!(
                self.warns,
                offset,
                len = data.len(),
                "virtio-mmio: register read not 32-bit aligned; reads 0"
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            guest_warn!(
                self.warns,
                offset,
                len = data.len(),
                "virtio-mmio: register write not 32 bits wide; ignored"
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            guest_warn!(
                self.warns,
                offset,
                "virtio-mmio: misaligned register write ignored"
            );
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

fn lock(dev: &Arc<Mutex<dyn VirtioDevice>>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    dev.lock().unwrap_or_else(PoisonError::into_inner)
}

mod lifecycle;
mod state;
#[cfg(test)]
mod tests;
