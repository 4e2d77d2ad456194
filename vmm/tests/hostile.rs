//! Hostile guests on the direct path: a hand-made guest abuses the vsock (or net) device's
//! virtio-mmio window (writes out of protocol, then an avail ring whose index runs far past
//! the ring). kiln marks the device DEVICE_NEEDS_RESET and logs it; the VMM, the serial
//! device and the host socket keep working, and a reset brings the device back.

use std::time::{Duration, Instant};

use kiln::arch::x86_64::regs::CpuMode;
use kiln::vmm::{GuestExit, MachineSpec, Vmm, VsockSpec};

mod console_capture;
mod netns;
use console_capture::Captured;
use kiln_devices::virtio::net::tap;
use netns::in_netns;

/// The vsock device's register window (the first virtio-mmio slot).
const WINDOW: u64 = 0xd000_0000;
/// Where the guest puts queue q's rings: descriptors at +0, avail at +0x400, used at +0x800.
const RINGS: u32 = 0x10_0000;
const QUEUE_SIZE: u32 = 8;

/// virtio-mmio registers (virtio 1.2, 4.2.2).
mod reg {
    pub const DRIVER_FEATURES: u32 = 0x20;
    pub const DRIVER_FEATURES_SEL: u32 = 0x24;
    pub const QUEUE_SEL: u32 = 0x30;
    pub const QUEUE_NUM: u32 = 0x38;
    pub const QUEUE_READY: u32 = 0x44;
    pub const QUEUE_NOTIFY: u32 = 0x50;
    pub const STATUS: u32 = 0x70;
    pub const QUEUE_DESC_LOW: u32 = 0x80;
    pub const QUEUE_DRIVER_LOW: u32 = 0x90;
    pub const QUEUE_DEVICE_LOW: u32 = 0xa0;
}

/// Machine code for the guest, built up an instruction at a time. `rdi` holds WINDOW (`al`
/// carries the bytes printed).
struct Code(Vec<u8>);

impl Code {
    fn new() -> Self {
        // cli: the device's config interrupt must not reach a guest without an IDT.
        let mut code = vec![0xfa, 0x48, 0xbf];
        code.extend_from_slice(&WINDOW.to_le_bytes()); // mov rdi, WINDOW
        code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
        Code(code)
    }
    /// mov dword [rdi + off], value
    fn write(&mut self, off: u32, value: u32) -> &mut Self {
        self.0.extend_from_slice(&[0xc7, 0x87]);
        self.0.extend_from_slice(&off.to_le_bytes());
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }
    /// mov word [addr], value (guest RAM)
    fn poke16(&mut self, addr: u32, value: u16) -> &mut Self {
        self.0.extend_from_slice(&[0x66, 0xc7, 0x04, 0x25]);
        self.0.extend_from_slice(&addr.to_le_bytes());
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }
    /// Prints the low byte of the status register on COM1.
    fn print_status(&mut self) -> &mut Self {
        self.0.extend_from_slice(&[0x8b, 0x9f]); // mov ebx, [rdi + STATUS]
        self.0.extend_from_slice(&reg::STATUS.to_le_bytes());
        self.0.extend_from_slice(&[0x88, 0xd8, 0xee]); // mov al, bl; out dx, al
        self
    }
    /// Spins until the status register has DEVICE_NEEDS_RESET (the device works on the
    /// event loop's thread, after the notify).
    fn wait_needs_reset(&mut self) -> &mut Self {
        self.0.extend_from_slice(&[0x8b, 0x9f]); // again: mov ebx, [rdi + STATUS]
        self.0.extend_from_slice(&reg::STATUS.to_le_bytes());
        self.0.extend_from_slice(&[0xf6, 0xc3, 0x40]); // test bl, 0x40
        self.0.extend_from_slice(&[0x74, 0xf5]); // jz again
        self
    }
    fn print(&mut self, byte: u8) -> &mut Self {
        self.0.extend_from_slice(&[0xb0, byte, 0xee]); // mov al, byte; out dx, al
        self
    }
    fn halt(&mut self) -> Vec<u8> {
        self.0.push(0xf4);
        std::mem::take(&mut self.0)
    }
}

/// The hostile driver of a device with `queues` queues, queue 1 being the one it corrupts
/// (tx for both vsock and net).
fn hostile_guest(queues: u32) -> Vec<u8> {
    let mut c = Code::new();
    // Out of protocol: notify, ready and an absurd size before any negotiation, a write
    // past the config space, DRIVER_OK out of order; then a reset.
    c.write(reg::QUEUE_NOTIFY, 1)
        .write(reg::QUEUE_READY, 1)
        .write(reg::QUEUE_NUM, 0xffff)
        .write(0x1f0, 0xdead_beef)
        .write(reg::STATUS, 0x04)
        .write(reg::STATUS, 0);
    // By the book: ACKNOWLEDGE, DRIVER, VERSION_1, FEATURES_OK, the queues, DRIVER_OK.
    c.write(reg::STATUS, 0x01)
        .write(reg::STATUS, 0x03)
        .write(reg::DRIVER_FEATURES_SEL, 1)
        .write(reg::DRIVER_FEATURES, 1)
        .write(reg::DRIVER_FEATURES_SEL, 0)
        .write(reg::DRIVER_FEATURES, 0)
        .write(reg::STATUS, 0x0b);
    for q in 0..queues {
        let base = RINGS + q * 0x1000;
        c.write(reg::QUEUE_SEL, q)
            .write(reg::QUEUE_NUM, QUEUE_SIZE)
            .write(reg::QUEUE_DESC_LOW, base)
            .write(reg::QUEUE_DRIVER_LOW, base + 0x400)
            .write(reg::QUEUE_DEVICE_LOW, base + 0x800)
            .write(reg::QUEUE_READY, 1);
    }
    c.write(reg::STATUS, 0x0f).print_status(); // 0x0f: live
                                               // The tx queue's avail index jumps 200 entries ahead of a ring of 8.
    c.poke16(RINGS + 0x1000 + 0x400 + 2, 200)
        .write(reg::QUEUE_NOTIFY, 1)
        .wait_needs_reset()
        .print_status(); // 0x4f: DEVICE_NEEDS_RESET
                         // A reset brings the device back to the start of the protocol.
    c.write(reg::STATUS, 0).print_status().print(b'K'); // 0x00, then 'K'
    c.halt()
}

/// Runs `vmm` until the guest has printed its four bytes (or a minute has passed), calls
/// `meanwhile` while the VM still runs, and returns what the guest printed and what
/// `meanwhile` said.
fn run_hostile<T>(
    vmm: Vmm,
    console: &Captured,
    meanwhile: impl FnOnce() -> T + Send,
) -> (Vec<u8>, T)
where
    T: Send,
{
    // With an irqchip HLT waits for an interrupt: stop the VM once the guest has printed
    // its four bytes, or after a minute (then the output says how far it got).
    let stop = vmm.stop_handle().unwrap();
    let watcher = console.clone();
    std::thread::scope(|s| {
        let waiter = s.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while watcher.bytes().len() < 4 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10)); // polling the console's length
            }
            let said = meanwhile();
            stop.stop();
            said
        });
        let report = vmm.run().expect("the VMM survives a hostile guest");
        assert_eq!(report.exit, GuestExit::Stopped);
        (console.bytes(), waiter.join().unwrap())
    })
}

/// Status after DRIVER_OK, after the corrupt ring, after the reset; then the serial port
/// still works.
const HOSTILE_OUTPUT: [u8; 4] = [0x0f, 0x4f, 0x00, b'K'];

#[test]
fn hostile_net_rings_mark_the_device_broken_and_nothing_else() {
    in_netns(|| {
        tap::create_persistent("kh0", None).unwrap();
        let console = Captured::default();
        let spec = MachineSpec {
            irqchip: true,
            net: Some("tap=kh0".parse().unwrap()),
            ..MachineSpec::raw(
                hostile_guest(2),
                0x1000,
                CpuMode::Long,
                Box::new(console.clone()),
            )
        };
        let vmm = Vmm::build(spec).unwrap();
        let (out, ()) = run_hostile(vmm, &console, || ());
        assert_eq!(out, HOSTILE_OUTPUT);
    });
}

#[test]
fn hostile_rings_mark_the_device_broken_and_nothing_else() {
    let dir = std::env::temp_dir().join(format!("kiln-hostile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");
    let console = Captured::default();
    let spec = MachineSpec {
        irqchip: true,
        vsock: Some(VsockSpec {
            cid: 3,
            uds_path: uds.clone(),
        }),
        ..MachineSpec::raw(
            hostile_guest(3),
            0x1000,
            CpuMode::Long,
            Box::new(console.clone()),
        )
    };
    let vmm = Vmm::build(spec).unwrap();
    // The host side still works while the VM runs: the socket takes a connection.
    let (out, host_connected) = run_hostile(vmm, &console, || {
        std::os::unix::net::UnixStream::connect(&uds).is_ok()
    });
    assert_eq!(out, HOSTILE_OUTPUT);
    assert!(host_connected, "the vsock socket stopped accepting");
    std::fs::remove_dir_all(&dir).unwrap();
}
