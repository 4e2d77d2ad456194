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

/// Why a window cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("MMIO window {:#x} with IRQ {} is not one kiln places devices at", .0.base, .0.irq)]
    Foreign(MmioWindow),
    #[error(
        "two devices at MMIO window {:#x} / IRQ {} and {:#x} / IRQ {}",
        .0.base, .0.irq, .1.base, .1.irq
    )]
    Taken(MmioWindow, MmioWindow),
    #[error("a VM has at most {MAX_DEVICES} virtio devices")]
    Full,
}

/// The windows and lines in use.
#[derive(Default)]
pub struct Windows {
    used: Vec<MmioWindow>,
}

impl Windows {
    /// Takes the first window and line no device has yet.
    pub fn take_next(&mut self) -> Result<MmioWindow, WindowError> {
        let window = (0..MAX_DEVICES)
            .filter_map(MmioWindow::nth)
            .find(|w| !self.used.iter().any(|u| u.base == w.base || u.irq == w.irq))
            .ok_or(WindowError::Full)?;
        self.claim(window)?;
        Ok(window)
    }

    /// Takes `window`: refused if it is not one kiln hands out, or if its register window
    /// or interrupt line is already taken.
    pub fn claim(&mut self, window: MmioWindow) -> Result<(), WindowError> {
        if !window.is_valid() {
            return Err(WindowError::Foreign(window));
        }
        if let Some(u) = self
            .used
            .iter()
            .find(|u| u.base == window.base || u.irq == window.irq)
        {
            return Err(WindowError::Taken(*u, window));
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
        w.claim(MmioWindow::nth(1).unwrap()).unwrap();
        assert_eq!(w.take_next(), Ok(MmioWindow::nth(0).unwrap()));
        assert_eq!(w.take_next(), Ok(MmioWindow::nth(2).unwrap()));
        let first = MmioWindow::nth(0).unwrap();
        assert_eq!(w.claim(first), Err(WindowError::Taken(first, first)));
        assert!(w
            .claim(first)
            .unwrap_err()
            .to_string()
            .contains("two devices"));
        while w.take_next().is_ok() {}
        assert_eq!(w.take_next(), Err(WindowError::Full));
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
