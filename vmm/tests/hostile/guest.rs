//! Hand-made hostile guests: a machine-code builder for 64-bit guest code that pokes
//! virtio-mmio windows and guest RAM and reports on COM1, and [`run`], which boots the code
//! with `kiln run` (seccomp on, as in production) and returns what it printed and logged.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use kiln_tests::process::{exit_code, run_captured};

/// The vsock device's register window (the first virtio-mmio slot), the disk's (the
/// second) and the entropy device's (the third), as `kiln run --vsock … --disk …` lays
/// them out.
pub const VSOCK: u64 = 0xd000_0000;
pub const BLOCK: u64 = 0xd000_1000;
pub const RNG: u64 = 0xd000_2000;
/// What every byte of the test disk holds.
pub const DISK_BYTE: u8 = b'D';

/// virtio-mmio registers (virtio 1.2, 4.2.2).
pub mod reg {
    pub const MAGIC: u32 = 0x00;
    pub const VERSION: u32 = 0x04;
    pub const DEVICE_ID: u32 = 0x08;
    pub const DRIVER_FEATURES: u32 = 0x20;
    pub const DRIVER_FEATURES_SEL: u32 = 0x24;
    pub const QUEUE_SEL: u32 = 0x30;
    pub const QUEUE_NUM_MAX: u32 = 0x34;
    pub const QUEUE_NUM: u32 = 0x38;
    pub const QUEUE_READY: u32 = 0x44;
    pub const QUEUE_NOTIFY: u32 = 0x50;
    pub const INTERRUPT_STATUS: u32 = 0x60;
    pub const STATUS: u32 = 0x70;
    pub const QUEUE_DESC_LOW: u32 = 0x80;
    pub const QUEUE_DESC_HIGH: u32 = 0x84;
    pub const QUEUE_DRIVER_LOW: u32 = 0x90;
    pub const QUEUE_DEVICE_LOW: u32 = 0xa0;
    pub const CONFIG_GENERATION: u32 = 0xfc;
    pub const CONFIG: u32 = 0x100;
}

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// A queue's rings in guest RAM: descriptors at `base`, avail at +0x400, used at +0x800
/// (room for the 8-entry queues these guests set up).
#[derive(Clone, Copy)]
pub struct Rings {
    pub base: u32,
}

pub const QUEUE_SIZE: u32 = 8;

impl Rings {
    pub fn desc(self) -> u32 {
        self.base
    }
    pub fn avail(self) -> u32 {
        self.base + 0x400
    }
    pub fn used(self) -> u32 {
        self.base + 0x800
    }
    pub fn used_idx(self) -> u32 {
        self.used() + 2
    }
}

/// Machine code, built up an instruction at a time. `rdi` holds the current device window;
/// `dx` stays 0x3f8 (COM1) so that `out dx, al` prints `al`.
pub struct Code(Vec<u8>);

impl Code {
    /// cli (a device's config interrupt must not reach a guest without an IDT), then
    /// dx = COM1 and rdi = `window`.
    pub fn new(window: u64) -> Self {
        let mut c = Code(vec![0xfa, 0x66, 0xba, 0xf8, 0x03]);
        c.window(window);
        c
    }
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    /// mov rdi, window
    pub fn window(&mut self, window: u64) -> &mut Self {
        self.op(&[0x48, 0xbf]).op(&window.to_le_bytes())
    }
    /// mov dword [rdi + off], value
    pub fn write(&mut self, off: u32, value: u32) -> &mut Self {
        self.op(&[0xc7, 0x87])
            .op(&off.to_le_bytes())
            .op(&value.to_le_bytes())
    }
    /// A write of 1, 2 or 8 bytes (8: `value` sign-extended) at `[rdi + off]`.
    pub fn write_sized(&mut self, off: u32, size: u8, value: u32) -> &mut Self {
        let v = value.to_le_bytes();
        match size {
            1 => self.op(&[0xc6, 0x87]).op(&off.to_le_bytes()).op(&v[..1]),
            2 => self
                .op(&[0x66, 0xc7, 0x87])
                .op(&off.to_le_bytes())
                .op(&v[..2]),
            8 => self.op(&[0x48, 0xc7, 0x87]).op(&off.to_le_bytes()).op(&v),
            _ => self.write(off, value),
        }
    }
    /// A read of 1, 2, 4 or 8 bytes at `[rdi + off]` into rax (then discarded).
    pub fn read_sized(&mut self, off: u32, size: u8) -> &mut Self {
        let prefix: &[u8] = match size {
            1 => &[0x8a, 0x87],
            2 => &[0x66, 0x8b, 0x87],
            8 => &[0x48, 0x8b, 0x87],
            _ => &[0x8b, 0x87],
        };
        self.op(prefix).op(&off.to_le_bytes())
    }
    /// mov word [addr], value (guest RAM)
    pub fn poke16(&mut self, addr: u32, value: u16) -> &mut Self {
        self.op(&[0x66, 0xc7, 0x04, 0x25])
            .op(&addr.to_le_bytes())
            .op(&value.to_le_bytes())
    }
    /// mov dword [addr], value (guest RAM)
    pub fn poke32(&mut self, addr: u32, value: u32) -> &mut Self {
        self.op(&[0xc7, 0x04, 0x25])
            .op(&addr.to_le_bytes())
            .op(&value.to_le_bytes())
    }
    /// Descriptor `i` of the table at `table`.
    pub fn desc(
        &mut self,
        table: u32,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> &mut Self {
        let at = table + 16 * u32::from(i);
        #[allow(clippy::cast_possible_truncation)] // the two halves of addr
        self.poke32(at, addr as u32)
            .poke32(at + 4, (addr >> 32) as u32)
            .poke32(at + 8, len)
            .poke32(at + 12, u32::from(flags) | (u32::from(next) << 16))
    }
    /// Offers chain `head` as the avail ring's entry number `n` (0-based) and kicks queue
    /// `q`: avail.ring[n % size] = head, avail.idx = n + 1.
    pub fn offer(&mut self, rings: Rings, q: u32, n: u16, head: u16) -> &mut Self {
        let slot = u32::from(n) % QUEUE_SIZE;
        self.poke16(rings.avail() + 4 + 2 * slot, head)
            .poke16(rings.avail() + 2, n.wrapping_add(1))
            .write(reg::QUEUE_NOTIFY, q)
    }
    /// Prints the byte at guest address `addr`.
    pub fn print_mem(&mut self, addr: u32) -> &mut Self {
        self.op(&[0x8a, 0x04, 0x25])
            .op(&addr.to_le_bytes())
            .op(&[0xee])
    }
    /// Prints the low byte of the status register.
    pub fn print_status(&mut self) -> &mut Self {
        self.op(&[0x8b, 0x9f])
            .op(&reg::STATUS.to_le_bytes())
            .op(&[0x88, 0xd8, 0xee]) // mov al, bl; out dx, al
    }
    /// Prints the low byte of register `off`.
    pub fn print_reg(&mut self, off: u32) -> &mut Self {
        self.op(&[0x8b, 0x9f])
            .op(&off.to_le_bytes())
            .op(&[0x88, 0xd8, 0xee])
    }
    /// Spins until the u16 at `addr` (a used ring's idx) is `value`, or the device's status
    /// says DEVICE_NEEDS_RESET: the device works on kiln's event-loop thread.
    pub fn wait_used(&mut self, addr: u32, value: u16) -> &mut Self {
        // again: cmp word [addr], value; jz done
        self.op(&[0x66, 0x81, 0x3c, 0x25])
            .op(&addr.to_le_bytes())
            .op(&value.to_le_bytes())
            .op(&[0x74, 0x0b]);
        // mov ebx, [rdi + STATUS]; test bl, 0x40; jz again; done:
        self.op(&[0x8b, 0x9f])
            .op(&reg::STATUS.to_le_bytes())
            .op(&[0xf6, 0xc3, 0x40, 0x74, 0xe9])
    }
    /// Makes the avail index of queue `q` (at `rings`) jump 200 entries past its ring of 8
    /// and kicks it; waits for DEVICE_NEEDS_RESET and prints the status (0x4f).
    pub fn corrupt_avail(&mut self, rings: Rings, q: u32) -> &mut Self {
        self.poke16(rings.avail() + 2, 200)
            .write(reg::QUEUE_NOTIFY, q)
            .wait_needs_reset()
            .print_status()
    }
    /// Spins until the status register has DEVICE_NEEDS_RESET.
    pub fn wait_needs_reset(&mut self) -> &mut Self {
        self.op(&[0x8b, 0x9f]) // again: mov ebx, [rdi + STATUS]
            .op(&reg::STATUS.to_le_bytes())
            .op(&[0xf6, 0xc3, 0x40, 0x74, 0xf5]) // test bl, 0x40; jz again
    }
    pub fn print(&mut self, byte: u8) -> &mut Self {
        self.op(&[0xb0, byte, 0xee]) // mov al, byte; out dx, al
    }
    /// From a reset: ACKNOWLEDGE, DRIVER, VERSION_1 only, FEATURES_OK.
    pub fn negotiate(&mut self) -> &mut Self {
        self.write(reg::STATUS, 0)
            .write(reg::STATUS, 0x01)
            .write(reg::STATUS, 0x03)
            .write(reg::DRIVER_FEATURES_SEL, 1)
            .write(reg::DRIVER_FEATURES, 1)
            .write(reg::DRIVER_FEATURES_SEL, 0)
            .write(reg::DRIVER_FEATURES, 0)
            .write(reg::STATUS, 0x0b)
    }
    /// Sets up queue q of [`QUEUE_SIZE`] at `rings[q]`, each ready, with fresh (zeroed)
    /// ring indices: the device starts from index 0 after a reset.
    pub fn queues(&mut self, rings: &[Rings]) -> &mut Self {
        for (q, r) in (0u32..).zip(rings) {
            self.poke16(r.avail() + 2, 0).poke16(r.used_idx(), 0);
            self.write(reg::QUEUE_SEL, q)
                .write(reg::QUEUE_NUM, QUEUE_SIZE)
                .write(reg::QUEUE_DESC_LOW, r.desc())
                .write(reg::QUEUE_DRIVER_LOW, r.avail())
                .write(reg::QUEUE_DEVICE_LOW, r.used())
                .write(reg::QUEUE_READY, 1);
        }
        self
    }
    /// [`Code::negotiate`], [`Code::queues`], DRIVER_OK, then prints the status (0x0f
    /// when live).
    pub fn bring_up(&mut self, rings: &[Rings]) -> &mut Self {
        self.negotiate()
            .queues(rings)
            .write(reg::STATUS, 0x0f)
            .print_status()
    }
    /// The end: reset through the i8042 (`kiln run` exits 0), then spin.
    pub fn reset_vm(&mut self) -> Vec<u8> {
        self.op(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]);
        std::mem::take(&mut self.0)
    }
    /// Runs what `body` emits in a loop forever (`jmp rel32` back to its start).
    pub fn forever(&mut self, body: impl FnOnce(&mut Code)) -> Vec<u8> {
        let start = self.0.len();
        body(self);
        let back = i32::try_from(self.0.len() + 5 - start).unwrap();
        self.op(&[0xe9]).op(&(-back).to_le_bytes());
        std::mem::take(&mut self.0)
    }
    /// hlt: for the in-process test, whose VMM stops on it.
    pub fn halt(&mut self) -> Vec<u8> {
        self.op(&[0xf4]);
        std::mem::take(&mut self.0)
    }
}

/// How a guest drives one device: brings it up (printing 0x0f), and makes a good request
/// as number `n` (printing what the device's test expects of it).
pub struct Driver {
    pub bring_up: fn(&mut Code),
    pub probe: fn(&mut Code, u16),
}

/// The end every device's hostile test shares, once its device (`broken`) has been marked
/// DEVICE_NEEDS_RESET: the `other` device still works, a reset brings `broken` back, the
/// serial port prints 'K'; then the VM resets, run as [`run`] runs it.
pub fn recover_and_run(mut c: Code, name: &str, other: Driver, broken: Driver) -> Outcome {
    (other.bring_up)(&mut c);
    (other.probe)(&mut c, 0);
    (broken.bring_up)(&mut c);
    (broken.probe)(&mut c, 0);
    c.print(b'K');
    run(name, &c.reset_vm())
}

/// What a hostile guest's run left.
pub struct Outcome {
    /// The guest's serial output.
    pub console: Vec<u8>,
    /// kiln's stderr: its log.
    pub log: String,
}

/// Boots `code` with `kiln run` (64 MiB, a vsock device and a 64 KiB disk of
/// [`DISK_BYTE`]s) and asserts that kiln exited 0, on the guest's reset, without panicking.
pub fn run(name: &str, code: &[u8]) -> Outcome {
    let dir = crate::util::scratch(name);
    let path = |f: &str| -> PathBuf { dir.join(f) };
    std::fs::write(path("guest.elf"), kiln_tests::tiny_kernel::elf(code)).unwrap();
    std::fs::write(path("disk.img"), vec![DISK_BYTE; 64 * 1024]).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.arg("run").arg("--memory").arg("64");
    for (flag, file) in [
        ("--kernel", "guest.elf"),
        ("--vsock", "v.sock"),
        ("--disk", "disk.img"),
        ("--serial", "console"),
    ] {
        cmd.arg(flag).arg(path(file));
    }
    // A guest that waits for a device that never answers spins: the deadline ends it.
    let run = run_captured(cmd, Duration::from_secs(60)).unwrap();
    let console = std::fs::read(path("console")).unwrap_or_default();
    let log = run.output.clone();
    let status = run.status.unwrap_or_else(|| {
        panic!("kiln did not exit within 60 s; console {console:?}; log:\n{log}")
    });
    assert_eq!(exit_code(status), 0, "console {console:?}; log:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
    Outcome { console, log }
}
