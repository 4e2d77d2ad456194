//! MMIO windows and interrupt lines for virtio devices: handed out in order to a new VM,
//! claimed exactly as recorded by a restored one.

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::layout::MMIO_DEVICES_START;

/// The stride between virtio-mmio register windows.
pub const WINDOW_STRIDE: u64 = 0x1000;
/// IOAPIC pins for virtio-mmio devices start here (4 is the console, 1/12 are PS/2).
pub const FIRST_IRQ: u32 = 5;
/// The IOAPIC's last pin (it has 24).
pub const LAST_IRQ: u32 = 23;
/// How many virtio devices one VM can have: one per interrupt line.
pub const MAX_DEVICES: usize = (LAST_IRQ - FIRST_IRQ + 1) as usize;

/// Where a virtio device sits: the base of its register window and its interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MmioWindow {
    pub base: u64,
    pub irq: u32,
}

impl MmioWindow {
    /// The `index`th window and line a new VM hands out.
    pub fn nth(index: usize) -> Option<MmioWindow> {
        let i = u32::try_from(index).ok().filter(|_| index < MAX_DEVICES)?;
        Some(MmioWindow {
            base: MMIO_DEVICES_START + u64::from(i) * WINDOW_STRIDE,
            irq: FIRST_IRQ + i,
        })
    }

    /// Whether this is one of the windows kiln hands out (a restore takes no other).
    pub fn is_valid(&self) -> bool {
        let Some(offset) = self.base.checked_sub(MMIO_DEVICES_START) else {
            return false;
        };
        offset % WINDOW_STRIDE == 0
            && offset / WINDOW_STRIDE < MAX_DEVICES as u64
            && (FIRST_IRQ..=LAST_IRQ).contains(&self.irq)
    }
}

/// The windows and lines in use.
#[derive(Default)]
pub struct Windows {
    used: Vec<MmioWindow>,
}

impl Windows {
    /// The first window and line no device has yet.
    pub fn next_free(&self) -> Option<MmioWindow> {
        (0..MAX_DEVICES)
            .filter_map(MmioWindow::nth)
            .find(|w| !self.used.iter().any(|u| u.base == w.base || u.irq == w.irq))
    }

    /// Takes `window`: refused if it is not one kiln hands out, or if its register window
    /// or interrupt line is already taken.
    pub fn claim(&mut self, window: MmioWindow) -> Result<(), String> {
        if !window.is_valid() {
            return Err(format!(
                "MMIO window {:#x} with IRQ {} is not one kiln places devices at",
                window.base, window.irq
            ));
        }
        if let Some(u) = self
            .used
            .iter()
            .find(|u| u.base == window.base || u.irq == window.irq)
        {
            return Err(format!(
                "two devices at MMIO window {:#x} / IRQ {} and {:#x} / IRQ {}",
                u.base, u.irq, window.base, window.irq
            ));
        }
        self.used.push(window);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_handed_out_in_order_and_claimed_once() {
        let mut w = Windows::default();
        let first = w.next_free().unwrap();
        assert_eq!(first, MmioWindow::nth(0).unwrap());
        w.claim(MmioWindow::nth(2).unwrap()).unwrap();
        w.claim(first).unwrap();
        assert_eq!(w.next_free(), MmioWindow::nth(1));
        assert!(w.claim(first).unwrap_err().contains("two devices"));
    }

    #[test]
    fn foreign_windows_are_refused() {
        let mut w = Windows::default();
        let good = MmioWindow::nth(0).unwrap();
        for bad in [
            MmioWindow {
                base: good.base + 8,
                ..good
            },
            MmioWindow { base: 0, ..good },
            MmioWindow { irq: 4, ..good },
            MmioWindow { irq: 24, ..good },
            MmioWindow {
                base: MMIO_DEVICES_START + MAX_DEVICES as u64 * WINDOW_STRIDE,
                ..good
            },
        ] {
            assert!(!bad.is_valid(), "{bad:?}");
            assert!(w.claim(bad).is_err());
        }
        assert_eq!(MmioWindow::nth(MAX_DEVICES), None);
    }
}
