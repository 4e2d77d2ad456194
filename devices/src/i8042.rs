//! A minimal i8042 keyboard controller (ports 0x60..0x65): just enough for Linux to reboot.
//!
//! kiln guests have no keyboard. The controller is here because `reboot=k` makes Linux reset
//! the machine by waiting for the controller's input buffer to drain (`kb_wait()` polls the
//! status port) and then writing 0xFE, "pulse the reset line", to the command port. That write
//! signals the reset eventfd the VMM gave us, and the VMM ends (or restarts) the VM.
//!
//! If the guest kernel has the i8042 driver built in, it also probes the controller: read and
//! write the command byte, self-test, interface test, disable/enable the keyboard. Those are
//! answered through the one-byte output buffer, with status bit 0 set while a byte waits.
//! Nothing here raises an interrupt; keyboard-device commands written to the data port go
//! unanswered, as with no keyboard plugged in.
//!
//! Layout on the bus: base 0x60, length 5; offset 0 is the data port (0x60), offset 4 the
//! status (read) / command (write) port (0x64). Offsets 1..=3 read as 0 and ignore writes.

use std::convert::Infallible;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::persist::Persist;

/// The controller's first I/O port.
pub const I8042_BASE: u64 = 0x60;
/// Ports 0x60..0x65.
pub const I8042_PORT_LEN: u64 = 5;

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;

// Command byte ("controller configuration byte") bits.
const CB_KBD_INT: u8 = 0x01;
const CB_SYSTEM_FLAG: u8 = 0x04;
const CB_KBD_DISABLE: u8 = 0x10;
const CB_TRANSLATE: u8 = 0x40;

// Controller commands.
const CMD_READ_CB: u8 = 0x20;
const CMD_WRITE_CB: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_INTERFACE_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_PULSE_RESET: u8 = 0xfe;

const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_TEST_OK: u8 = 0x00;

/// The controller's state, for a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The command byte (read with 0x20, written with 0x60).
    pub command_byte: u8,
    /// The byte waiting in the output buffer for the guest to read at 0x60, if any.
    pub output: Option<u8>,
    /// A 0x60 command was written and the next data-port byte is the new command byte.
    pub awaiting_command_byte: bool,
    /// The last byte the guest wrote went to the command port (status bit 3).
    pub last_write_was_command: bool,
}

impl Default for I8042State {
    /// The controller as firmware leaves it: keyboard interrupt and translation on, POST
    /// passed, nothing waiting.
    fn default() -> Self {
        Self {
            command_byte: CB_KBD_INT | CB_SYSTEM_FLAG | CB_TRANSLATE,
            output: None,
            awaiting_command_byte: false,
            last_write_was_command: false,
        }
    }
}

/// What a restored [`I8042`] is built around besides its [`I8042State`].
#[derive(Debug)]
pub struct I8042RestoreArgs {
    /// Signalled when the guest pulses the reset line (as for [`I8042::new`]).
    pub reset_evt: EventFd,
}

/// The i8042 controller. Writing 0xFE to port 0x64 writes 1 to the reset eventfd.
#[derive(Debug)]
pub struct I8042 {
    state: I8042State,
    reset_evt: EventFd,
}

impl I8042 {
    /// A controller that signals `reset_evt` when the guest pulses the reset line.
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            state: I8042State::default(),
            reset_evt,
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_SYSTEM_FLAG;
        if self.state.output.is_some() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.state.last_write_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    fn command(&mut self, cmd: u8) {
        // A new command cancels a 0x60 that never got its data byte.
        self.state.awaiting_command_byte = false;
        match cmd {
            CMD_READ_CB => self.state.output = Some(self.state.command_byte),
            CMD_WRITE_CB => self.state.awaiting_command_byte = true,
            CMD_SELF_TEST => self.state.output = Some(SELF_TEST_OK),
            CMD_KBD_INTERFACE_TEST => self.state.output = Some(INTERFACE_TEST_OK),
            CMD_KBD_DISABLE => self.state.command_byte |= CB_KBD_DISABLE,
            CMD_KBD_ENABLE => self.state.command_byte &= !CB_KBD_DISABLE,
            CMD_PULSE_RESET => {
                tracing::debug!("i8042: guest pulsed the reset line");
                if let Err(e) = self.reset_evt.write(1) {
                    tracing::warn!("i8042: could not signal the guest's reset request: {e}");
                }
            }
            _ => tracing::debug!(cmd, "i8042: ignoring unsupported controller command"),
        }
    }

    fn data(&mut self, value: u8) {
        if self.state.awaiting_command_byte {
            self.state.awaiting_command_byte = false;
            self.state.command_byte = value;
        } else {
            tracing::debug!(
                value,
                "i8042: no keyboard attached; ignoring keyboard command"
            );
        }
    }
}

impl Persist for I8042 {
    type State = I8042State;
    type ConstructorArgs = I8042RestoreArgs;
    // Every I8042State is one the guest could have produced: nothing to reject.
    type Error = Infallible;

    fn save(&self) -> I8042State {
        self.state
    }

    fn restore(args: I8042RestoreArgs, state: &I8042State) -> Result<Self, Infallible> {
        Ok(Self {
            state: *state,
            reset_evt: args.reset_evt,
        })
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.state.output.take().unwrap_or(0),
            COMMAND_OFFSET => self.status(),
            _ => 0,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            DATA_OFFSET => {
                self.state.last_write_was_command = false;
                self.data(value);
            }
            COMMAND_OFFSET => {
                self.state.last_write_was_command = true;
                self.command(value);
            }
            _ => tracing::debug!(offset, value, "i8042: ignoring write to unused port"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use std::io;
    use std::sync::{Arc, Mutex};

    const DATA: u64 = 0x60;
    const CMD: u64 = 0x64;

    struct Rig {
        bus: Bus,
        dev: Arc<Mutex<I8042>>,
        reset: EventFd,
    }

    fn rig() -> Rig {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = Arc::new(Mutex::new(I8042::new(reset.try_clone().unwrap())));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), I8042_BASE, I8042_PORT_LEN).unwrap();
        Rig { bus, dev, reset }
    }

    impl Rig {
        fn inb(&self, port: u64) -> u8 {
            let mut b = [0xffu8];
            assert!(self.bus.read(port, &mut b));
            b[0]
        }
        fn outb(&self, port: u64, value: u8) {
            assert!(self.bus.write(port, &[value]));
        }
        fn reset_requested(&self) -> bool {
            match self.reset.read() {
                Ok(n) => n > 0,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn status_reports_input_buffer_empty() {
        let r = rig();
        // kb_wait() spins until bit 1 (input buffer full) is clear.
        assert_eq!(r.inb(CMD) & 0x02, 0);
        assert_eq!(r.inb(CMD) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn pulse_reset_signals_the_reset_eventfd() {
        let r = rig();
        assert!(!r.reset_requested());
        // The reboot=k sequence: wait for the input buffer, then 0xFE to the command port.
        assert_eq!(r.inb(CMD) & 0x02, 0);
        r.outb(CMD, CMD_PULSE_RESET);
        assert!(r.reset_requested());
        // 0xFE on the data port is a keyboard command (resend), not a reset.
        r.outb(DATA, CMD_PULSE_RESET);
        assert!(!r.reset_requested());
    }

    #[test]
    fn self_and_interface_tests_answer_through_the_output_buffer() {
        let r = rig();
        r.outb(CMD, CMD_SELF_TEST);
        assert_eq!(r.inb(CMD) & STATUS_OUTPUT_FULL, STATUS_OUTPUT_FULL);
        assert_eq!(r.inb(DATA), SELF_TEST_OK);
        assert_eq!(r.inb(CMD) & STATUS_OUTPUT_FULL, 0, "reading empties it");

        r.outb(CMD, CMD_KBD_INTERFACE_TEST);
        assert_eq!(r.inb(CMD) & STATUS_OUTPUT_FULL, STATUS_OUTPUT_FULL);
        assert_eq!(r.inb(DATA), INTERFACE_TEST_OK);
        assert!(!r.reset_requested());
    }

    #[test]
    fn command_byte_read_write_and_kbd_disable() {
        let r = rig();
        r.outb(CMD, CMD_READ_CB);
        assert_eq!(r.inb(DATA), I8042State::default().command_byte);

        r.outb(CMD, CMD_WRITE_CB);
        assert_eq!(
            r.inb(CMD) & STATUS_LAST_WAS_COMMAND,
            STATUS_LAST_WAS_COMMAND
        );
        r.outb(DATA, 0x30);
        assert_eq!(r.inb(CMD) & STATUS_LAST_WAS_COMMAND, 0);
        r.outb(CMD, CMD_READ_CB);
        assert_eq!(r.inb(DATA), 0x30);

        r.outb(CMD, CMD_KBD_ENABLE);
        r.outb(CMD, CMD_READ_CB);
        assert_eq!(r.inb(DATA), 0x20);
        r.outb(CMD, CMD_KBD_DISABLE);
        r.outb(CMD, CMD_READ_CB);
        assert_eq!(r.inb(DATA), 0x30);

        // A data byte with no 0x60 pending does not touch the command byte.
        r.outb(DATA, 0xff);
        r.outb(CMD, CMD_READ_CB);
        assert_eq!(r.inb(DATA), 0x30);
    }

    #[test]
    fn unknown_commands_and_ports_are_ignored() {
        let r = rig();
        r.outb(CMD, 0xd4);
        r.outb(CMD, 0xa8);
        r.outb(0x62, 0x12);
        assert_eq!(r.inb(0x61), 0);
        assert_eq!(r.inb(CMD) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(r.inb(DATA), 0, "empty output buffer reads 0");
        assert!(!r.reset_requested());
        assert_eq!(r.dev.lock().unwrap().save().command_byte, 0x45);
    }

    #[test]
    fn state_round_trips() {
        let r = rig();
        r.outb(CMD, CMD_WRITE_CB);
        let state = r.dev.lock().unwrap().save();
        assert!(state.awaiting_command_byte);

        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let args = I8042RestoreArgs {
            reset_evt: reset.try_clone().unwrap(),
        };
        let Ok(mut restored) = I8042::restore(args, &state);
        restored.write(DATA_OFFSET, &[0x11]);
        restored.write(COMMAND_OFFSET, &[CMD_READ_CB]);
        let mut b = [0u8];
        restored.read(DATA_OFFSET, &mut b);
        assert_eq!(b, [0x11]);
        restored.write(COMMAND_OFFSET, &[CMD_PULSE_RESET]);
        assert_eq!(reset.read().unwrap(), 1);
    }
}
