//! [`SerialState`]: the serial console's snapshot state.
//!
//! vm-superio's own `SerialState` is not serde-serializable, so this is a field-for-field
//! copy that is, with lossless conversions both ways. It holds the UART's registers and the
//! input the guest has not read; the host-side output sink and panic watch are not state.

use serde::{Deserialize, Serialize};

/// The UART's registers and pending input: what a snapshot must carry for the console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Input the guest has not read yet (at most [`SERIAL_FIFO_LEN`](super::SERIAL_FIFO_LEN) bytes).
    pub in_buffer: Vec<u8>,
}

impl Default for SerialState {
    /// The state of a UART fresh out of reset.
    fn default() -> Self {
        Self::from(&vm_superio::SerialState::default())
    }
}

crate::persist::field_for_field!(
    SerialState,
    vm_superio::SerialState,
    [
        baud_divisor_low,
        baud_divisor_high,
        interrupt_enable,
        interrupt_identification,
        line_control,
        line_status,
        modem_control,
        modem_status,
        scratch,
        in_buffer,
    ]
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_uart_reset_state() {
        let ours = SerialState::default();
        assert_eq!(ours.line_status, 0x60, "THR empty and transmitter idle");
        assert_eq!(ours.interrupt_identification, 0x01, "no interrupt pending");
        assert!(ours.in_buffer.is_empty());
        assert_eq!(
            vm_superio::SerialState::from(&ours),
            vm_superio::SerialState::default()
        );
    }

    #[test]
    fn conversion_keeps_every_field() {
        let ours = SerialState {
            baud_divisor_low: 1,
            baud_divisor_high: 2,
            interrupt_enable: 3,
            interrupt_identification: 4,
            line_control: 5,
            line_status: 6,
            modem_control: 7,
            modem_status: 8,
            scratch: 9,
            in_buffer: vec![10, 11],
        };
        let theirs = vm_superio::SerialState::from(&ours);
        assert_eq!(theirs.scratch, 9);
        assert_eq!(theirs.baud_divisor_high, 2);
        assert_eq!(SerialState::from(&theirs), ours);
    }
}
