//! The network device: the [`VirtioDevice`] side (called by the MMIO transport from vCPU
//! threads) and the [`MutEventSubscriber`] side (called by the VMM's event loop), on one
//! object behind one mutex, as for block and vsock.
//!
//! Activation and reset happen on a vCPU thread, which cannot touch the event loop's epoll
//! set; they write the wake-up eventfd, and the event loop then brings the registrations in
//! line (new queue eventfds in, retired ones out before they are closed).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::consts::VIRTIO_NET_F_MAC;
use super::frames::{read_chain, write_chain};
use super::{
    MacAddr, NetError, Tap, CHAIN_BUDGET, MAX_FRAME_LEN, QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
    VIRTIO_ID_NET, VNET_HDR_LEN,
};
use crate::virtio::interest::{EpollOps, Registrations};
use crate::virtio::queue_ops::{add_used, notify, unusable};
use crate::virtio::{
    feature, read_config_bytes, ActivateError, GuestMemory, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};

/// Where `num_buffers` sits in the vnet header. The TAP skips those bytes when it writes a
/// frame, so the device sets it: one buffer per frame without MRG_RXBUF.
const NUM_BUFFERS_AT: usize = 10;

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
    wake_evt: EventFd,
    pub(crate) active: Option<Active>,
    /// Queue eventfds of a reset device, to unregister before they are closed.
    retired_evts: Vec<EventFd>,
    regs: Registrations,
    /// A frame read from the TAP that waits for an rx buffer (its length; 0 = none).
    rx_pending: usize,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    stats: NetStats,
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

    /// Move frames from the TAP into rx buffers until the TAP is empty (the edge-triggered
    /// TAP fd then fires again on the next frame) or the guest has no buffer left (the frame
    /// waits, and the guest's next rx kick resumes here).
    pub(crate) fn process_rx(&mut self) {
        let Self {
            active,
            tap,
            rx_pending,
            rx_buf,
            stats,
            ..
        } = self;
        let Some(a) = active else {
            // No driver: like a NIC whose link is down, drop what arrives.
            while tap.read_frame(rx_buf).is_ok_and(|n| n > 0) {}
            *rx_pending = 0;
            return;
        };
        let [queue, _] = &mut a.queues;
        if unusable(queue, &a.mem, &a.interrupt, "net rx") {
            return;
        }
        let mut used = false;
        loop {
            if *rx_pending == 0 {
                match tap.read_frame(rx_buf) {
                    Ok(n) if n >= VNET_HDR_LEN => *rx_pending = n,
                    // End of file: a TAP never says it, but a peer that went away must not
                    // make this loop spin.
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        warn!("virtio-net: reading the TAP {}: {e}", tap.name());
                        break;
                    }
                }
                rx_buf[NUM_BUFFERS_AT..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
            }
            let Some(chain) = queue.pop_descriptor_chain(&a.mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match write_chain(&a.mem, chain, &rx_buf[..*rx_pending]) {
                Ok(len) => {
                    stats.rx_frames += 1;
                    len
                }
                Err(e) => {
                    warn!(head, "virtio-net: dropping an rx frame: {e}");
                    stats.dropped += 1;
                    0
                }
            };
            add_used(queue, &a.mem, head, len, "virtio-net");
            *rx_pending = 0;
            used = true;
        }
        if used {
            notify(queue, &a.mem, &a.interrupt, "virtio-net");
        }
    }

    /// Send every available tx chain's frame to the TAP (at most [`CHAIN_BUDGET`] per call;
    /// the device kicks itself for the rest, after the event loop's other events).
    pub(crate) fn process_tx(&mut self) {
        let Self {
            active,
            tap,
            tx_buf,
            stats,
            ..
        } = self;
        let Some(a) = active else { return };
        let [_, queue] = &mut a.queues;
        if unusable(queue, &a.mem, &a.interrupt, "net tx") {
            return;
        }
        let mut used = false;
        let mut taken = 0;
        let mut empty_rounds = 0;
        'rounds: loop {
            // Without EVENT_IDX this sets NO_NOTIFY while we work.
            let _ = queue.disable_notification(&a.mem);
            let mut popped = false;
            while let Some(chain) = queue.pop_descriptor_chain(&a.mem) {
                let head = chain.head_index();
                match read_chain(&a.mem, chain, tx_buf) {
                    Ok(n) => {
                        // No offload was negotiated: flags, GSO and checksum fields mean
                        // nothing, and the TAP must not act on them.
                        tx_buf[..NUM_BUFFERS_AT].fill(0);
                        match tap.write_frame(&tx_buf[..n]) {
                            Ok(_) => stats.tx_frames += 1,
                            Err(e) => {
                                debug!("virtio-net: TAP {} refused a frame: {e}", tap.name());
                                stats.dropped += 1;
                            }
                        }
                    }
                    Err(e) => {
                        warn!(head, "virtio-net: dropping a tx chain: {e}");
                        stats.dropped += 1;
                    }
                }
                add_used(queue, &a.mem, head, 0, "virtio-net");
                used = true;
                popped = true;
                taken += 1;
                if taken >= CHAIN_BUDGET {
                    let _ = a.evts[TX_QUEUE].write(1);
                    break 'rounds;
                }
            }
            // A ring that keeps announcing chains it does not yield is corrupt: stop rather
            // than spin, and wait for the next kick.
            empty_rounds = if popped { 0 } else { empty_rounds + 1 };
            match queue.enable_notification(&a.mem) {
                Ok(true) if empty_rounds < 2 => continue,
                Ok(true) => {
                    warn!("virtio-net: tx avail ring is inconsistent; waiting for the next kick");
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    warn!("virtio-net: cannot re-enable tx notifications: {e}");
                    break;
                }
            }
        }
        if used {
            notify(queue, &a.mem, &a.interrupt, "virtio-net");
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
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_MAC)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only in legacy devices; a modern driver uses the control queue.
        warn!(
            offset,
            len = data.len(),
            "virtio-net: the config space is read-only; write ignored"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: VirtioInterrupt,
    ) -> Result<(), ActivateError> {
        let got = queues.len().min(queue_evts.len());
        let (Ok(queues), Ok(evts)) = (
            <[Queue; 2]>::try_from(queues),
            <[EventFd; 2]>::try_from(queue_evts),
        ) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
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
