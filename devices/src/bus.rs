//! The port-I/O and MMIO bus that vCPU threads dispatch exits to.
//!
//! When a vCPU exits on an `in`/`out` or on an access to unbacked guest-physical memory, the
//! VMM looks the address up here and hands the access to the device that owns it, with the
//! address rebased to the device's own range (`offset = addr - base`). One `Bus` serves the
//! PIO space and another the MMIO space; both are shared by every vCPU thread as `Arc<Bus>`,
//! so the map itself is immutable once built and each device sits behind its own mutex.
//!
//! A device that panicked while holding its lock must not take the vCPU threads down with it:
//! a poisoned mutex is recovered rather than unwrapped.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A device that can sit on a [`Bus`]. Offsets are relative to the base the device was
/// inserted at, and an access never runs past the end of the device's range.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not be placed on a [`Bus`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The range to insert is empty.
    #[error("bus range at {base:#x} has length 0; a device needs at least one byte")]
    ZeroLength {
        /// The requested base address.
        base: u64,
    },
    /// `base + len` does not fit in 64 bits.
    #[error("bus range at {base:#x} with length {len:#x} runs past the end of the address space")]
    OutOfSpace {
        /// The requested base address.
        base: u64,
        /// The requested length.
        len: u64,
    },
    /// The range to insert overlaps a device that is already on the bus.
    #[error(
        "bus range {base:#x}..={last:#x} overlaps the device already at \
         {other_base:#x}..={other_last:#x}; pick a free range"
    )]
    Overlap {
        /// First address of the rejected range.
        base: u64,
        /// Last address (inclusive) of the rejected range.
        last: u64,
        /// First address of the device already there.
        other_base: u64,
        /// Last address (inclusive) of the device already there.
        other_last: u64,
    },
}

/// A device as the bus holds it: shared with whoever else needs to reach it (the VMM's
/// event loop, snapshot code).
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

/// One device's slot: its length and the device.
#[derive(Clone)]
struct Slot {
    len: u64,
    device: SharedBusDevice,
}

/// An address space of non-overlapping device ranges, keyed by base address.
#[derive(Clone, Default)]
pub struct Bus {
    slots: BTreeMap<u64, Slot>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Place `dev` at `base..base + len`. Fails if `len` is 0, if the range wraps past the end
    /// of the address space, or if it overlaps a device already on the bus.
    pub fn insert(&mut self, dev: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        // Work with the inclusive last address so a range may end exactly at u64::MAX.
        let last = base
            .checked_add(len - 1)
            .ok_or(BusError::OutOfSpace { base, len })?;
        // Existing ranges are disjoint, so the only candidate for an overlap is the device
        // with the highest base that is <= our last address.
        if let Some((&other_base, slot)) = self.slots.range(..=last).next_back() {
            let other_last = other_base + (slot.len - 1);
            if other_last >= base {
                return Err(BusError::Overlap {
                    base,
                    last,
                    other_base,
                    other_last,
                });
            }
        }
        self.slots.insert(base, Slot { len, device: dev });
        Ok(())
    }

    /// Find the device that owns every byte of `addr..addr + size`, and the offset of `addr`
    /// into it.
    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &SharedBusDevice)> {
        if size == 0 {
            return None;
        }
        let (&base, slot) = self.slots.range(..=addr).next_back()?;
        let offset = addr - base;
        // `offset < slot.len` is the address being inside the range at all; the access must
        // also end inside it.
        let fits = offset < slot.len && (size as u64) <= slot.len - offset;
        fits.then_some((offset, &slot.device))
    }

    /// Dispatch a read of `data.len()` bytes at `addr`. Returns true if a device handled it.
    /// An access that starts in a device's range but runs past its end, or an empty access,
    /// is not handled.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatch a write of `data` at `addr`. Returns true if a device handled it; the same
    /// rules as [`Bus::read`] apply.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.slots
                    .iter()
                    .map(|(base, slot)| format!("{base:#x}..={:#x}", base + (slot.len - 1))),
            )
            .finish()
    }
}

/// Lock a device, recovering the guard if an earlier holder panicked.
fn lock(dev: &SharedBusDevice) -> MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every access it sees; reads return `offset + i` in byte `i`.
    #[derive(Default)]
    struct Recorder {
        reads: Vec<(u64, usize)>,
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.reads.push((offset, data.len()));
            for (i, b) in data.iter_mut().enumerate() {
                *b = u8::try_from(offset).unwrap() + u8::try_from(i).unwrap();
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn bus_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Bus>();
        check::<Arc<Bus>>();
    }

    #[test]
    fn dispatch_rebases_to_device_offset() {
        let a = recorder();
        let b = recorder();
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x60, 5).unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x64, &[0xfe]));
        assert!(bus.write(0x3f8, b"x"));

        assert_eq!(a.lock().unwrap().reads, vec![(5, 1)]);
        assert_eq!(a.lock().unwrap().writes, vec![(0, vec![b'x'])]);
        assert_eq!(b.lock().unwrap().writes, vec![(4, vec![0xfe])]);
        assert!(b.lock().unwrap().reads.is_empty());
    }

    #[test]
    fn multi_byte_access_inside_range() {
        let a = recorder();
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x1000, 0x10).unwrap();
        let mut data = [0u8; 4];
        assert!(bus.read(0x100c, &mut data));
        assert_eq!(data, [12, 13, 14, 15]);
        assert_eq!(a.lock().unwrap().reads, vec![(12, 4)]);
    }

    #[test]
    fn unmapped_and_straddling_accesses_are_not_handled() {
        let a = recorder();
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x1000, 0x10).unwrap();
        let mut data = [0xaau8; 4];
        // Below, after, and straddling the end of the range.
        assert!(!bus.read(0xfff, &mut data[..1]));
        assert!(!bus.read(0x1010, &mut data[..1]));
        assert!(!bus.read(0x100d, &mut data));
        assert!(!bus.write(0x100f, &[1, 2]));
        // An empty access is not dispatched either.
        assert!(!bus.write(0x1000, &[]));
        // The device saw nothing and the buffer was not touched.
        assert!(a.lock().unwrap().reads.is_empty());
        assert!(a.lock().unwrap().writes.is_empty());
        assert_eq!(data, [0xaa; 4]);
        // The last byte of the range is still reachable.
        assert!(bus.write(0x100f, &[1]));
    }

    #[test]
    fn overlaps_and_bad_ranges_are_rejected() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x100, 0x10).unwrap();

        assert_eq!(
            bus.insert(recorder(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                last: 0x10f,
                other_base: 0x100,
                other_last: 0x10f
            })
        );
        // Starts below, ends inside.
        assert!(matches!(
            bus.insert(recorder(), 0xf0, 0x11),
            Err(BusError::Overlap { .. })
        ));
        // Swallows the existing range whole.
        assert!(matches!(
            bus.insert(recorder(), 0x0, 0x1000),
            Err(BusError::Overlap { .. })
        ));
        assert_eq!(
            bus.insert(recorder(), 0x200, 0),
            Err(BusError::ZeroLength { base: 0x200 })
        );
        assert_eq!(
            bus.insert(recorder(), u64::MAX, 2),
            Err(BusError::OutOfSpace {
                base: u64::MAX,
                len: 2
            })
        );

        // Neighbours on either side fit, as does a range ending at the top of the space.
        bus.insert(recorder(), 0xf0, 0x10).unwrap();
        bus.insert(recorder(), 0x110, 0x10).unwrap();
        bus.insert(recorder(), u64::MAX, 1).unwrap();
        assert!(bus.write(u64::MAX, &[0]));
    }

    struct Panicker;
    impl BusDevice for Panicker {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(7);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {
            panic!("device bug");
        }
    }

    #[test]
    fn poisoned_device_does_not_panic_later_callers() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Panicker)), 0x10, 1).unwrap();
        let bus = Arc::new(bus);
        let b = bus.clone();
        let joined = std::thread::spawn(move || b.write(0x10, &[1])).join();
        assert!(joined.is_err(), "the device write should have panicked");

        let mut data = [0u8; 1];
        assert!(bus.read(0x10, &mut data));
        assert_eq!(data, [7]);
    }
}
