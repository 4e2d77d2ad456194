//! The transport's snapshot state: the register file as the driver left it.
//!
//! The device behind the window is saved and restored on its own (its queues carry the
//! ring progress). Restoring both: make one [`VirtioInterrupt`] and one eventfd per queue,
//! restore the device with clones of them (its [`Persist::restore`], e.g. with
//! `VsockRestoreArgs`), then the transport around it with [`MmioRestoreArgs`]; the
//! transport does not re-activate the device.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::{MmioError, MmioTransport};
use crate::persist::Persist;
use crate::virtio::state::{check_version, queue_from};
use crate::virtio::{GuestMemory, QueueSnapshot, VirtioDevice, VirtioInterrupt};

/// The format version of [`MmioTransportState`].
pub const MMIO_STATE_VERSION: u32 = 1;

/// The virtio-mmio register state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// [`MMIO_STATE_VERSION`] when written.
    pub version: u32,
    /// The device status register.
    pub device_status: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// Each queue's registers as the driver set them.
    pub queues: Vec<QueueSnapshot>,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
}

impl Default for MmioTransportState {
    /// A transport no driver has touched: every register 0, no queue set up.
    fn default() -> Self {
        Self {
            version: MMIO_STATE_VERSION,
            device_status: 0,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            queues: Vec::new(),
            interrupt_status: 0,
            config_generation: 0,
        }
    }
}

/// What a restored [`MmioTransport`] is built around besides its [`MmioTransportState`].
pub struct MmioRestoreArgs {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The device behind the window, already restored.
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// The interrupt the device was restored with.
    pub interrupt: VirtioInterrupt,
    /// One eventfd per queue (created with `EFD_NONBLOCK`), whose clones the device was
    /// restored with. Register them with KVM as for a new transport.
    pub queue_evts: Vec<EventFd>,
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type ConstructorArgs = MmioRestoreArgs;
    type Error = MmioError;

    fn save(&self) -> MmioTransportState {
        MmioTransportState {
            version: MMIO_STATE_VERSION,
            device_status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features: self.driver_features,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            queues: self.queues.iter().map(|q| (&q.state()).into()).collect(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
        }
    }

    fn restore(args: MmioRestoreArgs, state: &MmioTransportState) -> Result<Self, MmioError> {
        let MmioRestoreArgs {
            mem,
            device,
            interrupt,
            queue_evts,
        } = args;
        check_version(state.version, MMIO_STATE_VERSION, |found, expected| {
            MmioError::StateVersion { found, expected }
        })?;
        let mut t = Self::with_parts(mem, device, interrupt, queue_evts)?;
        if state.driver_features & !t.device_features != 0 {
            return Err(MmioError::BadState(format!(
                "driver features {:#x} were never offered (offer {:#x})",
                state.driver_features, t.device_features
            )));
        }
        if state.queues.len() != t.queues.len() {
            return Err(MmioError::BadState(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                t.queues.len()
            )));
        }
        for (i, (q, saved)) in t.queues.iter_mut().zip(&state.queues).enumerate() {
            if saved.max_size != q.max_size() {
                return Err(MmioError::BadState(format!(
                    "queue {i} had maximum size {}, the device offers {}",
                    saved.max_size,
                    q.max_size()
                )));
            }
            *q = queue_from(i, saved)?;
        }
        t.status = state.device_status;
        t.device_features_sel = state.device_features_sel;
        t.driver_features = state.driver_features;
        t.driver_features_sel = state.driver_features_sel;
        t.queue_sel = state.queue_sel;
        t.interrupt
            .restore(state.interrupt_status, state.config_generation);
        Ok(t)
    }
}
