//! The network device: the [`VirtioDevice`] side (called by the MMIO transport from vCPU
//! threads) and the [`MutEventSubscriber`] side (called by the VMM's event loop), on one
//! object behind one mutex, as for block and vsock. Activation, reset and the epoll
//! registrations are [`Queues`]'.

use std::os::fd::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::debug;

use super::consts::VIRTIO_NET_F_MAC;
use super::{MacAddr, NetError, Tap, MAX_FRAME_LEN, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_ID_NET};
use crate::virtio::activation::{Queues, Ready};
use crate::virtio::interest::EpollOps;
use crate::virtio::{
    feature, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Frame counters, for tests and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames given to the guest.
    pub rx_frames: u64,
    /// Frames sent to the TAP.
    pub tx_frames: u64,
    /// Frames dropped: malformed chains, rx chains too small, TAP write errors.
    pub dropped: u64,
}

/// A virtio-net device over a TAP.
pub struct Net {
    pub(crate) tap: Tap,
    pub(crate) mac: MacAddr,
    pub(crate) acked_features: u64,
    pub(crate) queues: Queues<2>,
    /// A frame read from the TAP that waits for an rx buffer (its length; 0 = none).
    pub(super) rx_pending: usize,
    pub(super) rx_buf: Vec<u8>,
    pub(super) tx_buf: Vec<u8>,
    pub(super) stats: NetStats,
}

impl Net {
    /// A device over `tap` whose guest sees the address `mac`.
    pub fn new(tap: Tap, mac: MacAddr) -> Result<Self, NetError> {
        Ok(Self {
            tap,
            mac,
            acked_features: 0,
            queues: Queues::new("virtio-net").map_err(NetError::EventFd)?,
            rx_pending: 0,
            rx_buf: vec![0; MAX_FRAME_LEN],
            tx_buf: Vec::new(),
            stats: NetStats::default(),
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The TAP's interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// Frame counters since the device was created.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Whether the driver has activated the device.
    pub fn is_active(&self) -> bool {
        self.queues.is_active()
    }

    /// Handle readiness of `fd` (one of ours). Tests call this directly.
    pub(crate) fn handle_event(&mut self, fd: RawFd) {
        match self.queues.ready(fd) {
            Ready::Wake => {
                // After activation or a restore: frames may wait in the TAP and chains in
                // the tx ring whose kicks happened before anyone listened.
                self.process_rx();
                self.process_tx();
            }
            Ready::Queue(RX_QUEUE) => self.process_rx(),
            Ready::Queue(TX_QUEUE) => self.process_tx(),
            Ready::Queue(_) => {}
            Ready::Other if fd == self.tap.as_raw_fd() => self.process_rx(),
            Ready::Other => {}
        }
    }

    /// Bring the epoll registrations in line: the TAP (edge-triggered) besides the wake-up
    /// and queue eventfds.
    pub(crate) fn sync_interest(&mut self, ops: &mut dyn EpollOps) {
        let tap = (
            self.tap.as_raw_fd(),
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        );
        self.queues.sync(&[tap], &[], ops);
    }

    /// The config space: the MAC address (the only field without MQ/STATUS/MTU).
    fn config(&self) -> [u8; 6] {
        self.mac.0
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        // EVENT_IDX: far fewer kicks and interrupts per frame, which matters most when
        // each VM exit is expensive.
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX) | feature(VIRTIO_NET_F_MAC)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn config_space(&self) -> Vec<u8> {
        // The MAC is writable only in legacy devices; a modern driver uses the control queue.
        self.config().to_vec()
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.queues.activate(activation)?;
        debug!(mac = %self.mac, tap = self.tap.name(), "virtio-net: activated");
        Ok(())
    }

    fn reset(&mut self) {
        self.queues.reset();
        self.acked_features = 0;
        self.rx_pending = 0;
        debug!("virtio-net: reset");
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.sync_interest(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.handle_event(events.fd());
        self.sync_interest(ops);
    }
}
