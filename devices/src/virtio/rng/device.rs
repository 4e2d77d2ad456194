//! The entropy device: the [`VirtioDevice`] side (called by the MMIO transport from vCPU
//! threads) and the [`MutEventSubscriber`] side (called by the VMM's event loop), on one
//! object behind one mutex, as for block. Activation, reset and the epoll registrations
//! are [`Queues`]'.

use std::io::Write;
use std::os::fd::RawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::debug;
use virtio_queue::DescriptorChain;

use super::{RngError, MAX_REQUEST_LEN, QUEUE_SIZE, VIRTIO_ID_RNG};
use crate::entropy::fill_random;
use crate::virtio::activation::{Active, Queues, Ready};
use crate::virtio::interest::EpollOps;
use crate::virtio::queue_ops::drain;
use crate::virtio::{
    feature, ActivateError, Activation, GuestMemory, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

/// The most requests one call takes from the queue (see [`drain`]).
pub(crate) const CHAIN_BUDGET: usize = 2 * QUEUE_SIZE as usize;

/// A virtio-rng device that hands the guest the host's random bytes.
pub struct Rng {
    pub(crate) acked_features: u64,
    pub(crate) queues: Queues<1>,
    /// Reused for every request: at most [`MAX_REQUEST_LEN`] bytes.
    scratch: Vec<u8>,
}

impl Rng {
    pub fn new() -> Result<Self, RngError> {
        Ok(Self {
            acked_features: 0,
            queues: Queues::new("virtio-rng").map_err(RngError::EventFd)?,
            scratch: Vec::new(),
        })
    }

    /// Whether the driver has activated the device.
    pub fn is_active(&self) -> bool {
        self.queues.is_active()
    }

    #[cfg(test)]
    pub(crate) fn queue_fd(&self) -> Option<RawFd> {
        self.queues.queue_fd(0)
    }

    /// Handle readiness of `fd` (one of ours). Tests call this directly.
    pub(crate) fn handle_event(&mut self, fd: RawFd) {
        if self.queues.ready(fd) == Ready::Queue(0) {
            self.process_queue();
        }
    }

    /// Fill every available request. Returns whether any chain was used.
    pub(crate) fn process_queue(&mut self) -> bool {
        let Some(Active {
            mem,
            queues: [queue],
            interrupt,
            evts: [evt],
        }) = &mut self.queues.active
        else {
            return false;
        };
        if interrupt.queue_unusable(queue, mem, "virtio-rng request") {
            return false;
        }
        let scratch = &mut self.scratch;
        drain(
            queue,
            mem,
            evt,
            (interrupt, "virtio-rng"),
            CHAIN_BUDGET,
            |chain| (fill_request(mem, chain, scratch), 1),
        )
    }

    fn sync_interest(&mut self, ops: &mut dyn EpollOps) {
        self.queues.sync(&[], &[], ops);
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
            crate::guest_warn!(
                static,
                head,
                "virtio-rng: unusable request (buffers outside guest memory?): {e}"
            );
            return 0;
        }
    };
    let len = writer.available_bytes().min(MAX_REQUEST_LEN);
    scratch.resize(len, 0);
    if let Err(e) = fill_random(scratch) {
        crate::guest_warn!(static, head, "virtio-rng: getrandom failed: {e}");
        return 0;
    }
    match writer.write_all(scratch) {
        Ok(()) => u32::try_from(len).unwrap_or(0),
        Err(e) => {
            crate::guest_warn!(
                static,
                head,
                "virtio-rng: cannot write the request's buffers: {e}"
            );
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

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.queues.activate(activation)?;
        debug!("virtio-rng: activated");
        Ok(())
    }

    fn reset(&mut self) {
        self.queues.reset();
        self.acked_features = 0;
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
