//! The legacy devices every kiln VM has, and the buses vCPU exits are dispatched to.
//!
//! Devices live in `kiln-devices` and never call KVM; this module creates them, puts them
//! on the port-I/O bus and connects their interrupt eventfds to KVM as irqfds.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_devices::serial::{SerialConsole, COM1_BASE, COM1_IRQ, SERIAL_PORT_LEN};
use kiln_devices::{
    BootTimer, Bus, BusError, EventFdTrigger, GuestSignal, PanicWatch, SharedBusDevice,
    GUEST_SIGNAL_BASE, GUEST_SIGNAL_LEN, I8042, I8042_BASE, I8042_PORT_LEN,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vstate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// The port-I/O and MMIO buses the vCPU threads dispatch to.
#[derive(Default)]
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// Handles to the legacy devices that the VMM's main loop watches.
pub struct LegacyDevices {
    pub serial: Arc<Mutex<SerialConsole>>,
    pub panic_watch: PanicWatch,
    pub boot_timer: BootTimer,
    /// Written by the i8042 when the guest pulses the reset line.
    pub reset_evt: EventFd,
    /// Written by the guest-signal port when the guest marks boot done.
    pub boot_evt: EventFd,
}

fn eventfd() -> Result<EventFd, DeviceError> {
    EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)
}

/// Creates the serial console, the i8042 and the guest-signal port on `buses.pio`. With an
/// irqchip, the console's interrupt is wired to its GSI.
pub fn attach_legacy(
    vm: &Vm,
    buses: &mut Buses,
    console: Box<dyn Write + Send>,
    start: Instant,
    with_irqchip: bool,
) -> Result<LegacyDevices, DeviceError> {
    let serial_irq = eventfd()?;
    if with_irqchip {
        vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    }
    let serial = SerialConsole::new(EventFdTrigger::new(serial_irq), console);
    let panic_watch = serial.panic_watch();
    let serial = Arc::new(Mutex::new(serial));
    buses.pio.insert(
        serial.clone() as SharedBusDevice,
        COM1_BASE,
        SERIAL_PORT_LEN,
    )?;

    let reset_evt = eventfd()?;
    let i8042 = I8042::new(reset_evt.try_clone().map_err(DeviceError::EventFd)?);
    buses
        .pio
        .insert(Arc::new(Mutex::new(i8042)), I8042_BASE, I8042_PORT_LEN)?;

    let boot_evt = eventfd()?;
    let signal = GuestSignal::new(start, boot_evt.try_clone().map_err(DeviceError::EventFd)?);
    let boot_timer = signal.boot_timer();
    buses.pio.insert(
        Arc::new(Mutex::new(signal)),
        GUEST_SIGNAL_BASE,
        GUEST_SIGNAL_LEN,
    )?;

    Ok(LegacyDevices {
        serial,
        panic_watch,
        boot_timer,
        reset_evt,
        boot_evt,
    })
}
