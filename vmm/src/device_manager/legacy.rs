//! The legacy devices every kiln VM has (serial console, i8042 for reset, the guest-signal
//! port), on the port-I/O bus, and the buses vCPU exits are dispatched to.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_devices::serial::{
    SerialConsole, SerialRestoreArgs, COM1_BASE, COM1_IRQ, SERIAL_PORT_LEN,
};
use kiln_devices::{
    BootTimer, Bus, EventFdTrigger, GuestSignal, I8042RestoreArgs, PanicWatch, Persist,
    SharedBusDevice, GUEST_SIGNAL_BASE, GUEST_SIGNAL_LEN, I8042, I8042_BASE, I8042_PORT_LEN,
};
use vmm_sys_util::eventfd::EventFd;

use super::{eventfd, DeviceError};
use crate::vstate::vm::Vm;

/// The port-I/O and MMIO buses the vCPU threads dispatch to.
#[derive(Default)]
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// Handles to the legacy devices that the VMM's main loop watches.
pub struct LegacyDevices {
    pub serial: Arc<Mutex<SerialConsole>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub panic_watch: PanicWatch,
    pub boot_timer: BootTimer,
    /// Written by the i8042 when the guest pulses the reset line.
    pub reset_evt: EventFd,
    /// Written by the guest-signal port when the guest marks boot done.
    pub boot_evt: EventFd,
    /// Written when the guest asks for a snapshot (`kiln job --snapshot-at`).
    pub snapshot_evt: EventFd,
    /// Where the outcome of a guest's snapshot request is reported back to it.
    pub snapshot_requests: kiln_devices::SnapshotRequests,
}

/// Creates the serial console, the i8042 and the guest-signal port on `buses.pio`. With an
/// irqchip, the console's interrupt is wired to its GSI.
/// With `restore`, the UART and the i8042 start from a snapshot's state.
pub fn attach_legacy(
    vm: &Vm,
    buses: &mut Buses,
    console: Box<dyn Write + Send>,
    start: Instant,
    with_irqchip: bool,
    restore: Option<(&kiln_devices::SerialState, kiln_devices::I8042State)>,
) -> Result<LegacyDevices, DeviceError> {
    let serial_irq = eventfd()?;
    if with_irqchip {
        vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    }
    let serial_irq = EventFdTrigger::new(serial_irq);
    let serial = match restore {
        Some((state, _)) => {
            let args = SerialRestoreArgs {
                irq: serial_irq,
                out: console,
            };
            SerialConsole::restore(args, state)
                .map_err(|e| DeviceError::Restore(format!("serial console: {e}")))?
        }
        None => SerialConsole::new(serial_irq, console),
    };
    let panic_watch = serial.panic_watch();
    let serial = Arc::new(Mutex::new(serial));
    buses.pio.insert(
        serial.clone() as SharedBusDevice,
        COM1_BASE,
        SERIAL_PORT_LEN,
    )?;

    let reset_evt = eventfd()?;
    let i8042_evt = reset_evt.try_clone().map_err(DeviceError::EventFd)?;
    let i8042 = Arc::new(Mutex::new(match restore {
        Some((_, state)) => {
            let Ok(i8042) = I8042::restore(
                I8042RestoreArgs {
                    reset_evt: i8042_evt,
                },
                &state,
            );
            i8042
        }
        None => I8042::new(i8042_evt),
    }));
    buses
        .pio
        .insert(i8042.clone() as SharedBusDevice, I8042_BASE, I8042_PORT_LEN)?;

    let boot_evt = eventfd()?;
    let snapshot_evt = eventfd()?;
    let (signal, snapshot_requests) =
        GuestSignal::new(start, boot_evt.try_clone().map_err(DeviceError::EventFd)?)
            .with_snapshot_requests(snapshot_evt.try_clone().map_err(DeviceError::EventFd)?);
    let boot_timer = signal.boot_timer();
    buses.pio.insert(
        Arc::new(Mutex::new(signal)),
        GUEST_SIGNAL_BASE,
        GUEST_SIGNAL_LEN,
    )?;

    Ok(LegacyDevices {
        serial,
        i8042,
        panic_watch,
        boot_timer,
        reset_evt,
        boot_evt,
        snapshot_evt,
        snapshot_requests,
    })
}
