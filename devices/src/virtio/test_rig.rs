//! A device behind its MMIO transport with event-manager running it, as the VMM wires them:
//! the end-to-end tests of each device drive the transport's registers as a driver would.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::test_queue::{GuestQueue, QSIZE};
use super::{GuestMemory, MmioTransport, VirtioDevice};
use crate::bus::BusDevice;

pub(crate) type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// Runs `mgr` until `used` says something was used (at most `turns` times); returns that.
pub(crate) fn run_until_used<T>(
    mgr: &mut Manager,
    turns: usize,
    mut used: impl FnMut() -> Vec<T>,
) -> Vec<T> {
    let mut got = Vec::new();
    for _ in 0..turns {
        mgr.run_with_timeout(0).unwrap();
        got = used();
        if !got.is_empty() {
            break;
        }
    }
    got
}

/// The event loop and the transport of one device.
pub(crate) struct Wired {
    pub(crate) mgr: Manager,
    pub(crate) t: MmioTransport,
}

impl Wired {
    pub(crate) fn new<D>(mem: &GuestMemory, dev: &Arc<Mutex<D>>) -> Self
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let mut mgr = Manager::new().unwrap();
        mgr.add_subscriber(dev.clone());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(mem.clone(), dev.clone(), irq).unwrap();
        Self { mgr, t }
    }

    /// A 32-bit register write at `off`.
    pub(crate) fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    /// A 32-bit register read at `off`.
    pub(crate) fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Queue `index` of [`QSIZE`] entries at `q`'s rings, marked ready.
    pub(crate) fn set_queue(&mut self, index: u32, q: &GuestQueue<'_>) {
        let lo = |a: GuestAddress| u32::try_from(a.0).unwrap();
        self.w(0x30, index);
        self.w(0x38, u32::from(QSIZE));
        self.w(0x80, lo(q.mock.desc_table_addr()));
        self.w(0x90, lo(q.mock.avail_addr()));
        self.w(0xa0, lo(q.mock.used_addr()));
        self.w(0x44, 1);
    }

    /// [`run_until_used`] on this event loop.
    pub(crate) fn run_until_used<T>(
        &mut self,
        turns: usize,
        used: impl FnMut() -> Vec<T>,
    ) -> Vec<T> {
        run_until_used(&mut self.mgr, turns, used)
    }

    /// Runs the event loop `turns` times.
    pub(crate) fn run(&mut self, turns: usize) {
        for _ in 0..turns {
            self.mgr.run_with_timeout(0).unwrap();
        }
    }
}
