//! The block device: the [`VirtioDevice`] side (called by the MMIO transport from vCPU
//! threads) and the [`MutEventSubscriber`] side (called by the VMM's event loop), on one
//! object behind one mutex, as for vsock. Activation, reset and the epoll registrations
//! are [`Queues`]'.

use std::os::fd::RawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::debug;

use super::consts::*;
use super::state::Backend;
use super::{request, BlockError, QUEUE_SIZE, SECTOR_SIZE, SERIAL_LEN, VIRTIO_ID_BLOCK};
use crate::virtio::activation::{Active, Queues, Ready};
use crate::virtio::interest::EpollOps;
use crate::virtio::queue_ops::drain;
use crate::virtio::{
    feature, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// The most requests one call takes from the queue (see [`drain`]).
pub(crate) const CHAIN_BUDGET: usize = 2 * QUEUE_SIZE as usize;
/// A request costs one budget unit plus one per this many bytes it moved: one call moves
/// at most ~[`CHAIN_BUDGET`] × 64 KiB (32 MiB) before the event loop gets its turn, however
/// large the requests (each at most `MAX_REQUEST_LEN`).
pub(crate) const BYTES_PER_UNIT: u64 = 64 * 1024;

/// A virtio-blk device over a raw image or a copy-on-write overlay.
pub struct Block {
    pub(crate) backend: Backend,
    pub(crate) serial: [u8; SERIAL_LEN],
    pub(crate) acked_features: u64,
    pub(crate) queues: Queues<1>,
    scratch: Vec<u8>,
}

impl Block {
    /// A device over `backend` answering GET_ID with `serial` (cut or zero-padded to 20
    /// bytes). Use [`Block::default_serial`] for one derived from the image file.
    pub fn new(backend: impl Into<Backend>, serial: &[u8]) -> Result<Self, BlockError> {
        let mut id = [0u8; SERIAL_LEN];
        let n = serial.len().min(SERIAL_LEN);
        id[..n].copy_from_slice(&serial[..n]);
        Ok(Self {
            backend: backend.into(),
            serial: id,
            acked_features: 0,
            queues: Queues::new("virtio-blk").map_err(BlockError::EventFd)?,
            scratch: Vec::new(),
        })
    }

    /// The disk's capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.backend.disk().len() / SECTOR_SIZE
    }

    /// Whether the disk refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.backend.disk().is_read_only()
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Make every completed write durable (the backend's `fdatasync`), as a guest FLUSH
    /// does: the VMM calls it before it copies an overlay into a snapshot.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.backend.disk_mut().flush()
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

    /// Run every available request. Returns whether any chain was used.
    pub(crate) fn process_queue(&mut self) -> bool {
        let discard = !self.is_read_only();
        // Without FLUSH the driver cannot ask for durability, so every write gets it.
        let writethrough = self.acked_features & feature(VIRTIO_BLK_F_FLUSH) == 0;
        let Self {
            queues,
            backend,
            serial,
            scratch,
            ..
        } = self;
        let Some(Active {
            mem,
            queues: [queue],
            interrupt,
            evts: [evt],
        }) = &mut queues.active
        else {
            return false;
        };
        if interrupt.queue_unusable(queue, mem, "virtio-blk request") {
            return false;
        }
        let mut ctx = request::Ctx {
            disk: backend.disk_mut(),
            serial,
            discard,
            writethrough,
            scratch,
            moved: 0,
        };
        drain(
            queue,
            mem,
            evt,
            (interrupt, "virtio-blk"),
            CHAIN_BUDGET,
            |chain| {
                let before = ctx.moved;
                let used = request::handle(mem, chain, &mut ctx);
                let units = (ctx.moved - before) / BYTES_PER_UNIT;
                (used, 1 + usize::try_from(units).unwrap_or(CHAIN_BUDGET))
            },
        )
    }

    fn sync_interest(&mut self, ops: &mut dyn EpollOps) {
        self.queues.sync(&[], &[], ops);
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let mut f = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_SIZE_MAX)
            | feature(VIRTIO_BLK_F_BLK_SIZE)
            | feature(VIRTIO_BLK_F_FLUSH);
        if self.is_read_only() {
            f |= feature(VIRTIO_BLK_F_RO);
        } else {
            f |= feature(VIRTIO_BLK_F_DISCARD);
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn config_space(&self) -> Vec<u8> {
        // Only `writeback` is writable, and only with CONFIG_WCE, which is not offered.
        self.config().to_vec()
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.queues.activate(activation)?;
        debug!(capacity = self.capacity(), "virtio-blk: activated");
        Ok(())
    }

    fn reset(&mut self) {
        self.queues.reset();
        self.acked_features = 0;
        debug!("virtio-blk: reset");
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        self.sync_interest(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.handle_event(events.fd());
        self.sync_interest(ops);
    }
}
