//! The vsock device: the [`VirtioDevice`] side (called by the MMIO transport from vCPU
//! threads) and the [`MutEventSubscriber`] side (called by the VMM's event loop), on one
//! object behind one mutex. Activation, reset and the epoll registrations of the wake-up
//! and queue eventfds are [`Queues`]', as for the other devices; the device adds its host
//! sockets to the registrations and does any rx work that waited.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::{debug, info};
use virtio_queue::QueueT;

use super::muxer::Muxer;
use super::packet_io;
use super::{VsockError, EVENT_TRANSPORT_RESET, EVQ, QUEUE_SIZE, RXQ, TXQ, VIRTIO_ID_VSOCK};
use crate::virtio::activation::{Queues, Ready};
use crate::virtio::interest::EpollOps;
use crate::virtio::{
    feature, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// A virtio-vsock device whose host side is the Unix socket `uds_path`.
pub struct Vsock {
    guest_cid: u64,
    pub(crate) acked_features: u64,
    pub(crate) muxer: Muxer,
    /// The rx, tx and event queues, the wake-up eventfd and the epoll registrations.
    pub(crate) queues: Queues<3>,
    reset_event_pending: bool,
    /// Set from delivering a transport-reset event until the guest has handled it, as the
    /// event ring's available index moving past the value it had then shows (the driver
    /// re-posts the buffer after handling the event). Until then nothing goes to the guest:
    /// a connection the guest accepted before handling the reset would be dropped by it
    /// without a word to the host.
    rx_held_for_reset: Option<std::num::Wrapping<u16>>,
}

impl Vsock {
    /// A device for a guest with CID `guest_cid`, listening for host clients on `uds_path`
    /// (which must not exist yet). Guest connections to host port N go to `<uds_path>_N`.
    pub fn new(guest_cid: u64, uds_path: impl Into<PathBuf>) -> Result<Self, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::BadCid(guest_cid));
        }
        Ok(Self {
            guest_cid,
            acked_features: 0,
            queues: Queues::new("vsock").map_err(VsockError::EventFd)?,
            muxer: Muxer::new(uds_path.into(), guest_cid)?,
            reset_event_pending: false,
            rx_held_for_reset: None,
        })
    }

    /// Who may connect to the host socket besides what its mode allows: by default only
    /// this user and root (checked on each accepted client with `SO_PEERCRED`).
    pub fn set_peer_policy(&mut self, peers: crate::private::PeerPolicy) {
        self.muxer.peers = peers;
    }

    /// The guest's CID (the config space value).
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The Unix socket host clients connect to.
    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the driver has activated the device.
    pub fn is_active(&self) -> bool {
        self.queues.is_active()
    }

    /// Drop every connection and send VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event
    /// queue, so the guest drops its ends too (after a snapshot restore, connections do not
    /// survive). Returns true if the event went out now, false if it waits for the guest
    /// to post an event buffer.
    pub fn send_transport_reset(&mut self) -> Result<bool, VsockError> {
        if !self.queues.is_active() {
            return Err(VsockError::NotActive);
        }
        self.muxer.reset();
        self.reset_event_pending = true;
        // The event loop closes the dropped sockets.
        self.queues.wake();
        Ok(self.deliver_reset_event())
    }

    fn deliver_reset_event(&mut self) -> bool {
        let Some(a) = self.queues.active.as_mut() else {
            return false;
        };
        let queue = &mut a.queues[EVQ];
        if self.reset_event_pending
            && packet_io::write_event(queue, &a.mem, &a.interrupt, EVENT_TRANSPORT_RESET)
        {
            info!("vsock: transport reset event delivered");
            self.reset_event_pending = false;
            // The guest's re-posting of the buffer is what ends the hold: ask for its kick.
            let _ = queue.enable_notification(&a.mem);
            self.rx_held_for_reset = queue.avail_idx(&a.mem, Ordering::Acquire).ok();
        }
        !self.reset_event_pending
    }

    /// Whether the guest has yet to handle a delivered transport reset; ends the hold once
    /// it has.
    fn rx_held(&mut self) -> bool {
        let (Some(at_delivery), Some(a)) = (self.rx_held_for_reset, self.queues.active.as_ref())
        else {
            self.rx_held_for_reset = None;
            return false;
        };
        match a.queues[EVQ].avail_idx(&a.mem, Ordering::Acquire) {
            Ok(now) if now == at_delivery => true,
            _ => {
                debug!("vsock: the guest has handled the transport reset");
                self.rx_held_for_reset = None;
                false
            }
        }
    }

    /// Handle readiness of `fd` (one of ours). Tests call this directly.
    pub(crate) fn handle_event(&mut self, fd: RawFd, set: EventSet) {
        match self.queues.ready(fd) {
            Ready::Queue(TXQ) => self.process_tx(),
            // The wake-up, or an rx or event queue kick: the rx work below.
            Ready::Wake | Ready::Queue(_) => {}
            Ready::Other if fd == self.muxer.listener_fd() => self.muxer.accept(),
            Ready::Other => self.muxer.on_host_event(fd, set),
        }
        // Whatever happened may have produced packets for the guest.
        self.process_rx();
        if self.reset_event_pending {
            self.deliver_reset_event();
        }
    }

    pub(crate) fn process_tx(&mut self) {
        let Self { queues, muxer, .. } = self;
        if let Some(a) = &mut queues.active {
            let (queue, evt) = (&mut a.queues[TXQ], &a.evts[TXQ]);
            packet_io::drain_tx(queue, &a.mem, evt, &a.interrupt, |pkt| {
                muxer.on_guest_packet(pkt)
            });
        }
    }

    pub(crate) fn process_rx(&mut self) {
        if self.rx_held() {
            return;
        }
        let Self { queues, muxer, .. } = self;
        let Some(a) = &mut queues.active else {
            return;
        };
        // The muxer is borrowed by both closures in turn, never at once.
        let muxer = std::cell::RefCell::new(muxer);
        let more = packet_io::fill_rx(
            &mut a.queues[RXQ],
            &a.mem,
            &a.interrupt,
            || muxer.borrow().has_rx_work(),
            |pkt| muxer.borrow_mut().fill_rx(pkt),
        );
        if more {
            // Come back after the event loop's other events.
            let _ = a.evts[RXQ].write(1);
        }
    }

    /// Bring the epoll registrations in line with what the device wants (its queues', and
    /// the host sockets the muxer watches), then close the sockets that were waiting to
    /// leave the epoll set.
    pub(crate) fn sync_interest(&mut self, ops: &mut dyn EpollOps) {
        let mut sockets = Vec::new();
        self.muxer.interest(&mut sockets);
        let retired = self.muxer.take_retired();
        let fds: Vec<RawFd> = retired.iter().map(AsRawFd::as_raw_fd).collect();
        self.queues.sync(&sockets, &fds, ops);
        // Now out of the epoll set: close them.
        drop(retired);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn device_features(&self) -> u64 {
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn config_space(&self) -> Vec<u8> {
        // struct virtio_vsock_config { le64 guest_cid; }
        self.guest_cid.to_le_bytes().to_vec()
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.queues.activate(activation)?;
        debug!(guest_cid = self.guest_cid, "vsock: activated");
        Ok(())
    }

    fn reset(&mut self) {
        self.queues.reset();
        self.muxer.reset();
        self.acked_features = 0;
        self.reset_event_pending = false;
        self.rx_held_for_reset = None;
        debug!("vsock: reset");
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.sync_interest(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.handle_event(events.fd(), events.event_set());
        self.sync_interest(ops);
    }
}
