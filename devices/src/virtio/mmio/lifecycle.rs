//! The device status state machine: feature acceptance, activation and reset.

use tracing::debug;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{lock, MmioTransport};
use crate::guest_warn;
use crate::virtio::{
    feature, status, ActivateError, Activation, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

impl MmioTransport {
    pub(super) fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value & old != old {
            guest_warn!(
                self.warns,
                old,
                new = value,
                "virtio-mmio: driver tried to clear status bits; ignored"
            );
            return;
        }
        let added = value & !old;
        if added & status::FAILED != 0 {
            guest_warn!(
                self.warns,
                device_type = self.device_type,
                "virtio-mmio: the driver marked the device FAILED"
            );
            self.status |= status::FAILED;
        }
        let known = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        if added & !(known | status::FAILED) != 0 {
            guest_warn!(
                self.warns,
                value,
                "virtio-mmio: driver set reserved or device-only status bits; ignored"
            );
        }
        for bit in [
            status::ACKNOWLEDGE,
            status::DRIVER,
            status::FEATURES_OK,
            status::DRIVER_OK,
        ] {
            if added & bit == 0 {
                continue;
            }
            let ok = match bit {
                status::ACKNOWLEDGE => true,
                status::DRIVER => self.has(status::ACKNOWLEDGE),
                status::FEATURES_OK => self.has(status::DRIVER) && self.accept_features(),
                _ => self.has(status::FEATURES_OK) && self.activate(),
            };
            if !ok {
                guest_warn!(
                    self.warns,
                    old = self.status,
                    bit,
                    "virtio-mmio: status bit refused (out of order or rejected)"
                );
                return;
            }
            self.status |= bit;
        }
    }

    /// FEATURES_OK: the driver's choice must be a subset of the offer and include VERSION_1.
    fn accept_features(&mut self) -> bool {
        let extra = self.driver_features & !self.device_features;
        if extra != 0 {
            guest_warn!(self.warns,
                offered = self.device_features,
                accepted = self.driver_features,
                "virtio-mmio: driver accepted features the device did not offer; FEATURES_OK refused"
            );
            return false;
        }
        if self.driver_features & feature(VIRTIO_F_VERSION_1) == 0 {
            guest_warn!(
                self.warns,
                "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1; FEATURES_OK refused"
            );
            return false;
        }
        lock(&self.device).ack_features(self.driver_features);
        true
    }

    /// DRIVER_OK: validate the queues and hand them to the device. On failure the device
    /// is marked DEVICE_NEEDS_RESET (and the guest told through a config interrupt).
    fn activate(&mut self) -> bool {
        if self.has(status::DEVICE_NEEDS_RESET) {
            return false;
        }
        match self.try_activate() {
            Ok(()) => true,
            Err(e) => {
                guest_warn!(
                    self.warns,
                    device_type = self.device_type,
                    "virtio-mmio: DRIVER_OK refused: {e}"
                );
                self.status |= status::DEVICE_NEEDS_RESET;
                if let Err(e) = self.interrupt.signal_config_change() {
                    guest_warn!(
                        self.warns,
                        "virtio-mmio: cannot raise the config interrupt: {e}"
                    );
                }
                false
            }
        }
    }

    fn try_activate(&mut self) -> Result<(), ActivateError> {
        let event_idx = self.driver_features & feature(VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, q) in self.queues.iter_mut().enumerate() {
            if !q.ready() || !q.is_valid(&self.mem) {
                return Err(ActivateError::InvalidQueue { index });
            }
            q.set_event_idx(event_idx);
            let copy =
                Queue::try_from(q.state()).map_err(|_| ActivateError::InvalidQueue { index })?;
            queues.push(copy);
        }
        let evts = self
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()?;
        lock(&self.device).activate(Activation::new(
            self.mem.clone(),
            queues,
            evts,
            self.interrupt.clone(),
        ))
    }

    pub(super) fn reset(&mut self) {
        lock(&self.device).reset();
        for q in &mut self.queues {
            q.reset();
        }
        // A kick still pending on a queue eventfd is harmless: the device finds nothing to
        // do. (Draining it here could block if the VMM supplied blocking eventfds.)
        self.interrupt.clear();
        self.device_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        debug!(device_type = self.device_type, "virtio-mmio: device reset");
    }
}
