//! kiln's emulated devices. Nothing here calls KVM.
//!
//! Devices sit on a [`Bus`] (one for port I/O, one for MMIO) that the vCPU threads dispatch
//! exits to. A device raises its interrupt by writing an eventfd ([`EventFdTrigger`]) that
//! the VMM registered as an irqfd, and signals VMM-level events (guest reset, boot done)
//! through eventfds the VMM hands it. Every device is testable without KVM.
//!
//! [`virtio`] holds the virtio-mmio transport and the virtio devices (vsock, block, net, rng), which take
//! queue notifications from eventfds the VMM registers as ioeventfds.
//!
//! A device whose state a snapshot carries implements [`Persist`]: its state is a
//! serializable struct next to it, and the VMM saves and restores every device the same way.

pub mod bus;
pub mod console;
pub mod entropy;
pub mod guest_signal;
pub mod guest_warn;
pub mod i8042;
pub mod interrupt;
pub mod persist;
pub mod private;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, SharedBusDevice};
pub use console::PanicWatch;
pub use guest_signal::{
    BootTimer, GuestSignal, SnapshotRequests, GUEST_SIGNAL_BASE, GUEST_SIGNAL_LEN,
};
pub use i8042::{I8042RestoreArgs, I8042State, I8042, I8042_BASE, I8042_PORT_LEN};
pub use interrupt::EventFdTrigger;
pub use persist::Persist;
pub use serial::{
    SerialConsole, SerialError, SerialRestoreArgs, SerialState, COM1_BASE, COM1_IRQ,
    SERIAL_FIFO_LEN, SERIAL_PORT_LEN,
};
