//! The network device: the [`VirtioDevice`] side (called by the MMIO transport from vCPU
//! threads) and the [`MutEventSubscriber`] side (called by the VMM's event loop), on one
//! object behind one mutex, as for block and vsock.
//!
//! Activation and reset happen on a vCPU thread, which cannot touch the event loop's epoll
//! set; they write the wake-up eventfd, and the event loop then brings the registrations in
//! line (new queue eventfds in, retired ones out before they are closed).

use std::os::fd::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::{debug, warn};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::consts::VIRTIO_NET_F_MAC;
use super::{MacAddr, NetError, Tap, MAX_FRAME_LEN, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_ID_NET};
use crate::virtio::interest::{EpollOps, Registrations};
use crate::virtio::{
    exact_queues, feature, ActivateError, GuestMemory, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// The queues and what the device needs to use them, from activation to reset.
pub(crate) struct Active {
    pub(crate) mem: GuestMemory,
    pub(crate) queues: [Queue; 2],
    pub(crate) evts: [EventFd; 2],
    pub(crate) interrupt: VirtioInterrupt,
}

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
    pub(super) wake_evt: EventFd,
    pub(crate) active: Option<Active>,
    /// Queue eventfds of a reset device, to unregister before they are closed.
    pub(super) retired_evts: Vec<EventFd>,
    pub(super) regs: Registrations,
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
            wake_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd)?,
            active: None,
            retired_evts: Vec::new(),
            regs: Registrations::default(),
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
        self.active.is_some()
    }

    pub(crate) fn wake_fd(&self) -> RawFd {
        self.wake_evt.as_raw_fd()
    }

    pub(crate) fn queue_fd(&self, index: usize) -> Option<RawFd> {
        self.active.as_ref().map(|a| a.evts[index].as_raw_fd())
    }

    /// Handle readiness of `fd` (one of ours). Tests call this directly.
    pub(crate) fn handle_event(&mut self, fd: RawFd) {
        if fd == self.wake_fd() {
            let _ = self.wake_evt.read();
            // After activation or a restore: frames may wait in the TAP and chains in the
            // tx ring whose kicks happened before anyone listened.
            self.process_rx();
            self.process_tx();
        } else if fd == self.tap.as_raw_fd() {
            self.process_rx();
        } else if Some(fd) == self.queue_fd(RX_QUEUE) {
            self.consume_kick(RX_QUEUE);
            self.process_rx();
        } else if Some(fd) == self.queue_fd(TX_QUEUE) {
            self.consume_kick(TX_QUEUE);
            self.process_tx();
        }
    }

    fn consume_kick(&self, index: usize) {
        if let Some(a) = &self.active {
            let _ = a.evts[index].read();
        }
    }

    /// Bring the epoll registrations in line: the wake-up eventfd and the TAP (edge-
    /// triggered) always, the queue eventfds while active.
    pub(crate) fn sync_interest(&mut self, ops: &mut dyn EpollOps) {
        let mut desired = vec![
            (self.wake_fd(), EventSet::IN),
            (
                self.tap.as_raw_fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
        ];
        if let Some(a) = &self.active {
            desired.extend(a.evts.iter().map(|e| (e.as_raw_fd(), EventSet::IN)));
        }
        let evts = std::mem::take(&mut self.retired_evts);
        let retired: Vec<RawFd> = evts.iter().map(AsRawFd::as_raw_fd).collect();
        self.regs.sync(&desired, &retired, ops);
        drop(evts);
    }

    pub(crate) fn wake_event_loop(&self) {
        if let Err(e) = self.wake_evt.write(1) {
            warn!("virtio-net: cannot wake the event loop: {e}");
        }
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

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: VirtioInterrupt,
    ) -> Result<(), ActivateError> {
        let (queues, evts) = exact_queues::<2>(queues, queue_evts)?;
        debug!(mac = %self.mac, tap = self.tap.name(), "virtio-net: activated");
        self.active = Some(Active {
            mem,
            queues,
            evts,
            interrupt,
        });
        self.wake_event_loop();
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(a) = self.active.take() {
            self.retired_evts.extend(a.evts);
        }
        self.acked_features = 0;
        self.rx_pending = 0;
        self.wake_event_loop();
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
