//! Guest → VMM signals on a fixed I/O port.
//!
//! The guest writes one byte to [`SIGNAL_PORT`]; the VMM's guest-signal device turns it into
//! an event. Port I/O was chosen over MMIO because PID 1 can reach a port with `ioperm`
//! without mapping `/dev/mem`.

/// The I/O port the guest writes its signal byte to. Nothing in a PC-compatible machine
/// without PCI or ACPI lives here, so no guest driver touches it by accident.
pub const SIGNAL_PORT: u16 = 0x0440;

/// The guest's init (the agent) is up and ready for work: the boot-done mark that boot
/// time is measured to.
pub const BOOT_DONE: u8 = 0x01;

/// The guest asks the VMM to snapshot it now (`kiln job --snapshot-at`). The VMM pauses the
/// VM, writes the snapshot and resumes it; a read of [`SIGNAL_PORT`] then returns a status
/// byte whose low 7 bits count the snapshots completed so far (wrapping) and whose top bit
/// says the last one failed.
pub const SNAPSHOT_REQUEST: u8 = 0x02;
/// The top bit of the status byte: the last requested snapshot failed.
pub const SNAPSHOT_FAILED: u8 = 0x80;
/// The status byte of a VM that takes no snapshots on request.
pub const SNAPSHOT_UNSUPPORTED: u8 = 0xff;
