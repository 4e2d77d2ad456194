//! The serial console: a 16550A UART on the PIO bus (COM1, ports 0x3f8..0x400, IRQ 4).
//!
//! The register model is vm-superio's `Serial`; this module puts it on the [`Bus`], sends its
//! output through [`ConsoleOutput`] (the VMM's sink, plus the kernel-panic watch) and raises
//! its interrupt through an [`EventFdTrigger`]. [`SerialState`] (in `state.rs`) is the part a
//! snapshot carries.
//!
//! [`Bus`]: crate::bus::Bus

use std::io::{self, Write};

use vm_superio::serial::{Error as UartError, NoEvents};
use vm_superio::Serial;

use crate::bus::BusDevice;
use crate::console::{ConsoleOutput, PanicWatch};
use crate::interrupt::EventFdTrigger;
use crate::persist::Persist;

mod state;
pub use state::SerialState;

/// COM1's first I/O port.
pub const COM1_BASE: u64 = 0x3f8;
/// COM1's interrupt line (GSI) on a PC.
pub const COM1_IRQ: u32 = 4;
/// How many I/O ports a 16550 occupies.
pub const SERIAL_PORT_LEN: u64 = 8;
/// The UART's receive FIFO size: at most this many input bytes can wait for the guest.
pub const SERIAL_FIFO_LEN: usize = 64;

/// Errors from the serial console.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Writing the interrupt eventfd failed.
    #[error("could not raise the serial interrupt: {0}")]
    Interrupt(#[source] io::Error),
    /// Writing console output failed. (The console's own output path swallows sink errors,
    /// so this is not expected.)
    #[error("could not write serial console output: {0}")]
    Output(#[source] io::Error),
    /// The receive FIFO has no room; retry once the guest has read some input.
    #[error("the serial input FIFO is full; retry once the guest has read its input")]
    InputFull,
    /// A saved state holds more pending input than the FIFO can.
    #[error(
        "serial state holds {len} bytes of pending input but the FIFO holds at most \
         {SERIAL_FIFO_LEN}; the snapshot is corrupt"
    )]
    StateInputTooLong {
        /// The pending-input length in the state.
        len: usize,
    },
}

impl From<UartError<io::Error>> for SerialError {
    fn from(e: UartError<io::Error>) -> Self {
        match e {
            UartError::Trigger(e) => Self::Interrupt(e),
            UartError::IOError(e) => Self::Output(e),
            UartError::FullFifo => Self::InputFull,
        }
    }
}

/// What a restored [`SerialConsole`] is built around besides its [`SerialState`]: the
/// host side, which a snapshot cannot carry.
pub struct SerialRestoreArgs {
    /// The eventfd registered as the console's irqfd (as for [`SerialConsole::new`]).
    pub irq: EventFdTrigger,
    /// Receives the guest's console text from here on.
    pub out: Box<dyn Write + Send>,
}

/// A 16550A UART whose output goes to a host sink and whose interrupt is an eventfd.
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, NoEvents, ConsoleOutput>,
    watch: PanicWatch,
    irq_failed: bool,
}

impl SerialConsole {
    /// A UART fresh out of reset. `irq` is the eventfd registered as the irqfd for the
    /// console's GSI ([`COM1_IRQ`] at [`COM1_BASE`]); `out` receives the guest's console text.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        let out = ConsoleOutput::new(out);
        let watch = out.panic_watch();
        Self {
            uart: Serial::new(irq, out),
            watch,
            irq_failed: false,
        }
    }

    /// A handle that reports whether the guest kernel printed a panic on this console.
    pub fn panic_watch(&self) -> PanicWatch {
        self.watch.clone()
    }

    /// Queue host input for the guest and raise the receive interrupt if the guest enabled
    /// it. Returns how many bytes were taken (the FIFO holds [`SERIAL_FIFO_LEN`]); keep the
    /// rest and retry later. `Err(InputFull)` if no byte could be taken.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        Ok(self.uart.enqueue_raw_bytes(bytes)?)
    }

    /// How many more input bytes the FIFO can take now.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Flush the output sink, e.g. before the VMM exits with a partial line pending. (Output
    /// is otherwise flushed at every newline.)
    pub fn flush_output(&mut self) {
        self.uart.writer_mut().flush_sink();
    }

    fn irq_error(&mut self, e: UartError<io::Error>) {
        if !self.irq_failed {
            self.irq_failed = true;
            tracing::warn!(
                "serial console: {}; the guest may miss console interrupts \
                 (further errors are not reported)",
                SerialError::from(e)
            );
        }
    }
}

impl Persist for SerialConsole {
    type State = SerialState;
    type ConstructorArgs = SerialRestoreArgs;
    type Error = SerialError;

    fn save(&self) -> SerialState {
        SerialState::from(&self.uart.state())
    }

    /// Raises the interrupt at once if the state has one pending and enabled. The panic
    /// watch starts empty: take a new [`SerialConsole::panic_watch`].
    fn restore(args: SerialRestoreArgs, state: &SerialState) -> Result<Self, SerialError> {
        // vm-superio rejects this too, but as FullFifo, which becomes InputFull ("retry
        // later"); a state that cannot fit is a corrupt snapshot, and the error says so.
        if state.in_buffer.len() > SERIAL_FIFO_LEN {
            return Err(SerialError::StateInputTooLong {
                len: state.in_buffer.len(),
            });
        }
        let out = ConsoleOutput::new(args.out);
        let watch = out.panic_watch();
        let uart = Serial::from_state(&state.into(), args.irq, NoEvents, out)?;
        Ok(Self {
            uart,
            watch,
            irq_failed: false,
        })
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(reg), [byte]) => *byte = self.uart.read(reg),
            (_, data) => {
                tracing::debug!(offset, len = data.len(), "serial: ignoring non-byte read");
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (u8::try_from(offset), data) {
            (Ok(reg), &[value]) => {
                if let Err(e) = self.uart.write(reg, value) {
                    self.irq_error(e);
                }
            }
            _ => tracing::debug!(offset, len = data.len(), "serial: ignoring non-byte write"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use crate::console::tests::{BrokenSink, TestSink};
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    const THR: u64 = COM1_BASE;
    const IER: u64 = COM1_BASE + 1;
    const IIR: u64 = COM1_BASE + 2;
    const LCR: u64 = COM1_BASE + 3;
    const LSR: u64 = COM1_BASE + 5;
    const SCR: u64 = COM1_BASE + 7;
    const LSR_DATA_READY: u8 = 0x01;
    const LSR_THR_EMPTY_IDLE: u8 = 0x60;

    struct Rig {
        bus: Bus,
        serial: Arc<Mutex<SerialConsole>>,
        irq: EventFd,
        sink: TestSink,
    }

    fn rig() -> Rig {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let sink = TestSink::default();
        let serial = SerialConsole::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            Box::new(sink.clone()),
        );
        rig_with(serial, irq, sink)
    }

    fn rig_with(serial: SerialConsole, irq: EventFd, sink: TestSink) -> Rig {
        let serial = Arc::new(Mutex::new(serial));
        let mut bus = Bus::new();
        bus.insert(serial.clone(), COM1_BASE, SERIAL_PORT_LEN)
            .unwrap();
        Rig {
            bus,
            serial,
            irq,
            sink,
        }
    }

    impl Rig {
        fn inb(&self, port: u64) -> u8 {
            let mut b = [0u8];
            assert!(self.bus.read(port, &mut b));
            b[0]
        }
        fn outb(&self, port: u64, value: u8) {
            assert!(self.bus.write(port, &[value]));
        }
        /// Interrupts raised since the last call.
        fn irqs(&self) -> u64 {
            self.irq.read().unwrap_or(0)
        }
    }

    #[test]
    fn thr_writes_reach_the_sink_and_lsr_says_ready() {
        let r = rig();
        assert_eq!(r.inb(LSR) & LSR_THR_EMPTY_IDLE, LSR_THR_EMPTY_IDLE);
        for &b in b"ok\r\n" {
            r.outb(THR, b);
            // A virtual UART is always ready for the next byte.
            assert_eq!(r.inb(LSR) & LSR_THR_EMPTY_IDLE, LSR_THR_EMPTY_IDLE);
        }
        assert_eq!(r.sink.text(), "ok\r\n");
        assert_eq!(r.sink.flushed_len(), 4);
        assert_eq!(r.irqs(), 0, "no interrupt while IER is 0");
    }

    #[test]
    fn thr_empty_interrupt_follows_ier_and_iir() {
        let r = rig();
        r.outb(IER, 0x02); // enable THR-empty
        assert_eq!(
            r.irqs(),
            1,
            "enabling THRE with an empty THR interrupts at once"
        );
        // IIR reports THR empty (0x02) with the FIFO bits set, and reading it acknowledges.
        assert_eq!(r.inb(IIR), 0xc2);
        assert_eq!(r.inb(IIR), 0xc1, "nothing pending after the read");
        r.outb(THR, b'a');
        assert_eq!(
            r.irqs(),
            1,
            "each transmitted byte interrupts once acknowledged"
        );
        r.outb(THR, b'b');
        assert_eq!(r.irqs(), 0, "not again until IIR is read");
        assert_eq!(r.sink.text(), "ab");
    }

    #[test]
    fn host_input_is_read_through_rbr() {
        let r = rig();
        r.outb(IER, 0x01); // enable received-data-available
        assert_eq!(r.irqs(), 0);
        let taken = r.serial.lock().unwrap().enqueue_input(b"hi").unwrap();
        assert_eq!(taken, 2);
        assert_eq!(r.irqs(), 1);
        assert_eq!(r.inb(LSR) & LSR_DATA_READY, LSR_DATA_READY);
        assert_eq!(r.inb(THR), b'h');
        assert_eq!(r.inb(THR), b'i');
        assert_eq!(r.inb(LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_beyond_the_fifo_is_refused() {
        let r = rig();
        let mut s = r.serial.lock().unwrap();
        assert_eq!(s.enqueue_input(&[b'x'; 100]).unwrap(), SERIAL_FIFO_LEN);
        assert_eq!(s.input_capacity(), 0);
        assert!(matches!(s.enqueue_input(b"y"), Err(SerialError::InputFull)));
        assert_eq!(s.enqueue_input(b"").unwrap(), 0);
    }

    #[test]
    fn panic_line_seen_through_the_uart() {
        let r = rig();
        let watch = r.serial.lock().unwrap().panic_watch();
        for &b in b"Kernel panic - not syncing: No working init found.\r\n" {
            r.outb(THR, b);
        }
        assert_eq!(
            watch.panic_line().as_deref(),
            Some("Kernel panic - not syncing: No working init found.")
        );
    }

    #[test]
    fn broken_sink_keeps_the_uart_running() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = SerialConsole::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            Box::new(BrokenSink),
        );
        let r = rig_with(serial, irq, TestSink::default());
        r.outb(IER, 0x02);
        r.inb(IIR);
        r.irqs();
        for &b in b"Kernel panic - not syncing: x\n" {
            r.outb(THR, b);
            r.inb(IIR);
        }
        assert_eq!(r.irqs(), 30, "every byte still raises THR-empty");
        let watch = r.serial.lock().unwrap().panic_watch();
        assert!(watch.panic_line().is_some());
    }

    #[test]
    fn non_byte_accesses_are_ignored() {
        let r = rig();
        let mut two = [0xffu8; 2];
        assert!(r.bus.read(SCR - 1, &mut two));
        assert_eq!(two, [0, 0]);
        assert!(r.bus.write(THR, b"ab"));
        assert_eq!(r.sink.text(), "");
    }

    #[test]
    fn state_round_trips() {
        let r = rig();
        r.outb(SCR, 0xab);
        r.outb(LCR, 0x1b);
        r.outb(IER, 0x01);
        r.serial.lock().unwrap().enqueue_input(b"in").unwrap();
        r.irqs();
        let state = r.serial.lock().unwrap().save();
        assert_eq!(state.scratch, 0xab);
        assert_eq!(state.in_buffer, b"in");

        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let sink = TestSink::default();
        let args = SerialRestoreArgs {
            irq: EventFdTrigger::new(irq.try_clone().unwrap()),
            out: Box::new(sink.clone()),
        };
        let restored = SerialConsole::restore(args, &state).unwrap();
        let r2 = rig_with(restored, irq, sink);
        assert_eq!(r2.irqs(), 1, "pending RX interrupt is re-raised on restore");
        assert_eq!(r2.inb(SCR), 0xab);
        assert_eq!(r2.inb(LCR), 0x1b);
        assert_eq!(r2.inb(THR), b'i');
        assert_eq!(r2.inb(THR), b'n');
        assert_eq!(r2.inb(LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn corrupt_state_is_an_error() {
        let state = SerialState {
            in_buffer: vec![0; SERIAL_FIFO_LEN + 1],
            ..SerialState::default()
        };
        let irq = EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let args = SerialRestoreArgs {
            irq,
            out: Box::new(io::sink()),
        };
        let err = SerialConsole::restore(args, &state).err();
        assert!(matches!(
            err,
            Some(SerialError::StateInputTooLong { len: 65 })
        ));
    }
}
