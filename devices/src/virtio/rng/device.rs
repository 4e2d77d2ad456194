//! The entropy device: the [`VirtioDevice`] side (called by the MMIO transport from vCPU
//! threads) and the [`MutEventSubscriber`] side (called by the VMM's event loop), on one
//! object behind one mutex, as for block.
//!
//! Activation and reset happen on a vCPU thread, which cannot touch the event loop's epoll
//! set; they write the device's wake-up eventfd, and the event loop then registers the new
//! queue eventfd or unregisters the old one (before it is closed).

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::{debug, warn};
use virtio_queue::{DescriptorChain, Queue};
use vmm_sys_util::eventfd::EventFd;

use super::{RngError, MAX_REQUEST_LEN, QUEUE_SIZE, VIRTIO_ID_RNG};
use crate::entropy::fill_random;
use crate::virtio::interest::{EpollOps, Registrations};
use crate::virtio::queue_ops::drain;
use crate::virtio::{
    exact_queues, feature, ActivateError, GuestMemory, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// The most requests one call takes from the queue (see [`drain`]).
pub(crate) const CHAIN_BUDGET: usize = 2 * QUEUE_SIZE as usize;

/// The queue and what the device needs to use it, from activation to reset.
pub(crate) struct Active {
    pub(crate) mem: GuestMemory,
    pub(crate) queue: Queue,
    pub(crate) evt: EventFd,
    pub(crate) interrupt: VirtioInterrupt,
}

/// A virtio-rng device that hands the guest the host's random bytes.
pub struct Rng {
    pub(crate) acked_features: u64,
    wake_evt: EventFd,
    pub(crate) active: Option<Active>,
    /// Queue eventfds of a reset device, to unregister before they are closed.
    retired_evts: Vec<EventFd>,
    registrations: Registrations,
    /// Reused for every request: at most [`MAX_REQUEST_LEN`] bytes.
    scratch: Vec<u8>,
}

impl Rng {
    pub fn new() -> Result<Self, RngError> {
        Ok(Self {
            acked_features: 0,
            wake_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(RngError::EventFd)?,
            active: None,
            retired_evts: Vec::new(),
            registrations: Registrations::default(),
            scratch: Vec::new(),
        })
    }

    /// Whether the driver has activated the device.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    pub(crate) fn wake_fd(&self) -> RawFd {
        self.wake_evt.as_raw_fd()
    }

    pub(crate) fn queue_fd(&self) -> Option<RawFd> {
        self.active.as_ref().map(|a| a.evt.as_raw_fd())
    }

    /// Handle readiness of `fd` (one of ours). Tests call this directly.
    pub(crate) fn handle_event(&mut self, fd: RawFd) {
        if fd == self.wake_fd() {
            let _ = self.wake_evt.read();
        } else if Some(fd) == self.queue_fd() {
            if let Some(a) = &self.active {
                let _ = a.evt.read();
            }
            self.process_queue();
        }
    }

    /// Fill every available request. Returns whether any chain was used.
    pub(crate) fn process_queue(&mut self) -> bool {
        let Self {
            active, scratch, ..
        } = self;
        let Some(Active {
            mem,
            queue,
            interrupt,
            evt,
        }) = active
        else {
            return false;
        };
        if interrupt.queue_unusable(queue, mem, "virtio-rng request") {
            return false;
        }
        drain(
            queue,
            mem,
            evt,
            (interrupt, "virtio-rng"),
            CHAIN_BUDGET,
            |chain| fill_request(mem, chain, scratch),
        )
    }

    /// Bring the epoll registrations in line: the wake-up eventfd always, the queue eventfd
    /// while active; retired eventfds leave the epoll set before they are closed.
    pub(crate) fn sync_interest(&mut self, ops: &mut dyn EpollOps) {
        let mut want = vec![(self.wake_fd(), EventSet::IN)];
        want.extend(self.queue_fd().map(|fd| (fd, EventSet::IN)));
        let retired: Vec<RawFd> = self.retired_evts.iter().map(AsRawFd::as_raw_fd).collect();
        self.registrations.sync(&want, &retired, ops);
        self.retired_evts.clear();
    }

    fn wake_event_loop(&self) {
        if let Err(e) = self.wake_evt.write(1) {
            warn!("virtio-rng: cannot wake the event loop: {e}");
        }
    }
}

/// Fills the writable buffers of `chain` with random bytes (at most [`MAX_REQUEST_LEN`]);
/// returns how many it wrote, 0 for a chain it cannot use.
fn fill_request(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    scratch: &mut Vec<u8>,
) -> u32 {
    let head = chain.head_index();
    let mut writer = match chain.writer(mem) {
        Ok(w) => w,
        Err(e) => {
            warn!(
                head,
                "virtio-rng: unusable request (buffers outside guest memory?): {e}"
            );
            return 0;
        }
    };
    let len = writer.available_bytes().min(MAX_REQUEST_LEN);
    scratch.resize(len, 0);
    if let Err(e) = fill_random(scratch) {
        warn!(head, "virtio-rng: getrandom failed: {e}");
        return 0;
    }
    match writer.write_all(scratch) {
        Ok(()) => u32::try_from(len).unwrap_or(0),
        Err(e) => {
            warn!(head, "virtio-rng: cannot write the request's buffers: {e}");
            0
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: VirtioInterrupt,
    ) -> Result<(), ActivateError> {
        let ([queue], [evt]) = exact_queues::<1>(queues, queue_evts)?;
        debug!("virtio-rng: activated");
        self.active = Some(Active {
            mem,
            queue,
            evt,
            interrupt,
        });
        self.wake_event_loop();
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(a) = self.active.take() {
            self.retired_evts.push(a.evt);
        }
        self.acked_features = 0;
        self.wake_event_loop();
        debug!("virtio-rng: reset");
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        self.sync_interest(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.handle_event(events.fd());
        self.sync_interest(ops);
    }
}
