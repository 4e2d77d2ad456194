//! The block device: the [`VirtioDevice`] side (called by the MMIO transport from vCPU
//! threads) and the [`MutEventSubscriber`] side (called by the VMM's event loop), on one
//! object behind one mutex, as for vsock.
//!
//! Activation and reset happen on a vCPU thread, which cannot touch the event loop's epoll
//! set; they write the device's wake-up eventfd, and the event loop then registers the new
//! queue eventfd or unregisters the old one (before it is closed).

use std::os::fd::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::{debug, warn};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::consts::*;
use super::state::Backend;
use super::{request, BlockError, QUEUE_SIZE, SECTOR_SIZE, SERIAL_LEN, VIRTIO_ID_BLOCK};
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

/// A virtio-blk device over a raw image or a copy-on-write overlay.
pub struct Block {
    pub(crate) backend: Backend,
    pub(crate) serial: [u8; SERIAL_LEN],
    pub(crate) acked_features: u64,
    wake_evt: EventFd,
    pub(crate) active: Option<Active>,
    /// Queue eventfds of a reset device, to unregister before they are closed.
    retired_evts: Vec<EventFd>,
    /// The queue eventfd registered with the event loop, if any.
    registered_queue: Option<RawFd>,
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
            wake_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?,
            active: None,
            retired_evts: Vec::new(),
            registered_queue: None,
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

    /// Run every available request. Returns whether any chain was used.
    pub(crate) fn process_queue(&mut self) -> bool {
        let discard = !self.is_read_only();
        // Without FLUSH the driver cannot ask for durability, so every write gets it.
        let writethrough = self.acked_features & feature(VIRTIO_BLK_F_FLUSH) == 0;
        let Self {
            active,
            backend,
            serial,
            scratch,
            ..
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
        if interrupt.queue_unusable(queue, mem, "virtio-blk request") {
            return false;
        }
        let mut ctx = request::Ctx {
            disk: backend.disk_mut(),
            serial,
            discard,
            writethrough,
            scratch,
        };
        drain(
            queue,
            mem,
            evt,
            (interrupt, "virtio-blk"),
            CHAIN_BUDGET,
            |chain| request::handle(mem, chain, &mut ctx),
        )
    }

    /// Bring the epoll registrations in line: the wake-up eventfd always, the queue eventfd
    /// while active; retired eventfds leave the epoll set before they are closed.
    fn sync_interest(&mut self, ops: &mut EventOps) {
        let want = self.queue_fd();
        if self.registered_queue != want {
            if let Some(fd) = self.registered_queue.take() {
                if let Err(e) = ops.remove(Events::empty_raw(fd)) {
                    warn!(
                        fd,
                        "virtio-blk: cannot unregister the old queue eventfd: {e}"
                    );
                }
            }
            if let Some(fd) = want {
                match ops.add(Events::new_raw(fd, EventSet::IN)) {
                    Ok(()) => self.registered_queue = Some(fd),
                    Err(e) => warn!(fd, "virtio-blk: cannot register the queue eventfd: {e}"),
                }
            }
        }
        self.retired_evts.clear();
    }

    fn wake_event_loop(&self) {
        if let Err(e) = self.wake_evt.write(1) {
            warn!("virtio-blk: cannot wake the event loop: {e}");
        }
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

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: VirtioInterrupt,
    ) -> Result<(), ActivateError> {
        let ([queue], [evt]) = exact_queues::<1>(queues, queue_evts)?;
        debug!(capacity = self.capacity(), "virtio-blk: activated");
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
        debug!("virtio-blk: reset");
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.wake_fd(), EventSet::IN)) {
            warn!("virtio-blk: cannot register the wake-up eventfd: {e}");
        }
        self.sync_interest(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.handle_event(events.fd());
        self.sync_interest(ops);
    }
}
