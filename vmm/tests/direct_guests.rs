//! Direct-path tests: tiny hand-made guests on this machine's /dev/kvm.
//!
//! Each guest is a few bytes of machine code (real mode or 64-bit long mode) that pokes
//! ports and MMIO and then halts or resets, so the VMM's core — memory, vCPU set-up, exit
//! dispatch, serial, i8042 reset, panic detection — is tested in milliseconds.

use std::sync::{Arc, Mutex};

use kiln::arch::x86_64::regs::CpuMode;
use kiln::vmm::{GuestExit, MachineSpec, RunReport, Vmm};
use kiln_devices::BusDevice;

mod util;
use util::console::{run_until, Captured};

const LOAD_ADDR: u64 = 0x1000;

struct Guest {
    code: Vec<u8>,
    mode: CpuMode,
    irqchip: bool,
    vcpus: u8,
    mmio: Vec<(u64, u64, kiln_devices::SharedBusDevice)>,
}

impl Guest {
    fn real(code: Vec<u8>) -> Self {
        Guest {
            code,
            mode: CpuMode::Real,
            irqchip: false,
            vcpus: 1,
            mmio: Vec::new(),
        }
    }
    fn long(code: Vec<u8>) -> Self {
        Guest {
            mode: CpuMode::Long,
            ..Guest::real(code)
        }
    }
    fn run(self) -> (RunReport, String) {
        let console = Captured::default();
        let spec = MachineSpec {
            vcpus: self.vcpus,
            irqchip: self.irqchip,
            extra_mmio: self.mmio,
            ..MachineSpec::raw(self.code, LOAD_ADDR, self.mode, Box::new(console.clone()))
        };
        let report = Vmm::build(spec).expect("build VM").run().expect("run VM");
        (report, console.text())
    }
}

/// Real-mode code that writes `text` to COM1 (0x3f8) a byte at a time.
fn print(text: &str) -> Vec<u8> {
    let mut code = vec![0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in text.bytes() {
        code.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    code
}

const HLT: u8 = 0xf4;
/// mov al, 0xfe; out 0x64, al: pulse the reset line through the i8042.
const I8042_RESET: [u8; 4] = [0xb0, 0xfe, 0xe6, 0x64];
/// jmp $: spin, so a test only ends through the path it is testing.
const SPIN: [u8; 2] = [0xeb, 0xfe];

#[test]
fn serial_output_and_hlt() {
    let mut code = print("hello from a real-mode guest\n");
    code.push(HLT);
    let (report, console) = Guest::real(code).run();
    assert_eq!(report.exit, GuestExit::Halted);
    assert_eq!(console, "hello from a real-mode guest\n");
}

#[test]
fn port_io_in_reads_the_device() {
    // out 0x64, 0xaa (i8042 self-test); in al, 0x60 (expect 0x55 = 'U'); print it.
    let mut code = vec![0xb0, 0xaa, 0xe6, 0x64, 0xe4, 0x60];
    code.extend_from_slice(&[0xba, 0xf8, 0x03, 0xee]); // mov dx, 0x3f8; out dx, al
                                                       // A port with no device reads as zero: in al, 0x99; add al, '0'; out dx, al.
    code.extend_from_slice(&[0xe4, 0x99, 0x04, b'0', 0xee, HLT]);
    let (report, console) = Guest::real(code).run();
    assert_eq!(report.exit, GuestExit::Halted);
    assert_eq!(console, "U0");
}

#[test]
fn i8042_reset_ends_the_vm_cleanly() {
    let mut code = print("bye\n");
    code.extend_from_slice(&I8042_RESET);
    code.extend_from_slice(&SPIN);
    let mut guest = Guest::real(code);
    guest.irqchip = true;
    let (report, console) = guest.run();
    assert_eq!(report.exit, GuestExit::Reset);
    assert!(report.exit.is_success());
    assert_eq!(console, "bye\n");
}

#[test]
fn reset_after_a_kernel_panic_line_is_a_panic() {
    let mut code = print("[    1.0] Kernel panic - not syncing: Attempted to kill init!\n");
    code.extend_from_slice(&I8042_RESET);
    code.extend_from_slice(&SPIN);
    let (report, _) = Guest::real(code).run();
    match report.exit {
        GuestExit::Panic(line) => assert!(line.contains("Attempted to kill init"), "{line}"),
        other => panic!("expected a panic exit, got {other:?}"),
    }
}

#[test]
fn boot_done_mark_is_timed() {
    // mov dx, SIGNAL_PORT; mov al, BOOT_DONE; out dx, al; hlt
    let port = kiln_agent::marks::SIGNAL_PORT.to_le_bytes();
    let code = vec![
        0xba,
        port[0],
        port[1],
        0xb0,
        kiln_agent::marks::BOOT_DONE,
        0xee,
        HLT,
    ];
    let (report, _) = Guest::real(code).run();
    assert_eq!(report.exit, GuestExit::Halted);
    let t = report.boot_time.expect("boot-done mark recorded");
    assert!(t.as_nanos() > 0);
    // A guest that never marks boot done has no boot time.
    let (report, _) = Guest::real(vec![HLT]).run();
    assert_eq!(report.boot_time, None);
}

/// An MMIO device that records writes and answers reads with a fixed pattern.
#[derive(Default)]
struct Probe {
    writes: Vec<(u64, Vec<u8>)>,
}

impl BusDevice for Probe {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = if offset == 8 && i == 0 { b'M' } else { 0 };
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

#[test]
fn long_mode_guest_does_mmio() {
    // In the 32-bit MMIO gap, so the guest reaches it through the boot identity map's
    // fourth GiB.
    const MMIO_BASE: u64 = 0xc000_0000;
    let mut code = vec![0x48, 0xb8];
    code.extend_from_slice(&MMIO_BASE.to_le_bytes()); // mov rax, MMIO_BASE
    code.extend_from_slice(&[0xc7, 0x00, 0x78, 0x56, 0x34, 0x12]); // mov dword [rax], 0x12345678
    code.extend_from_slice(&[0x8b, 0x58, 0x08]); // mov ebx, [rax+8]
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    code.extend_from_slice(&[0x88, 0xd8, 0xee, HLT]); // mov al, bl; out dx, al; hlt
    let probe = Arc::new(Mutex::new(Probe::default()));
    let mut guest = Guest::long(code);
    guest.mmio.push((MMIO_BASE, 0x1000, probe.clone()));
    let (report, console) = guest.run();
    assert_eq!(report.exit, GuestExit::Halted);
    assert_eq!(console, "M");
    assert_eq!(
        probe.lock().unwrap().writes,
        vec![(0, 0x1234_5678u32.to_le_bytes().to_vec())]
    );
}

#[test]
fn every_vcpu_runs() {
    // Without an irqchip every vCPU starts at the entry point; each prints once and halts.
    let mut code = print("v");
    code.push(HLT);
    let mut guest = Guest::real(code);
    guest.vcpus = 3;
    let (report, console) = guest.run();
    assert_eq!(report.exit, GuestExit::Halted);
    assert_eq!(console, "vvv");
}

#[test]
fn vsock_device_answers_on_the_mmio_bus() {
    // Read the virtio-mmio magic value and device ID of the first device window and print
    // them as 8 + 2 hex-free bytes: the magic is ASCII "virt", the device ID 19 (vsock).
    const WINDOW: u64 = 0xd000_0000;
    let mut code = vec![0x48, 0xb8];
    code.extend_from_slice(&WINDOW.to_le_bytes()); // mov rax, WINDOW
    code.extend_from_slice(&[0x8b, 0x18]); // mov ebx, [rax]      (MagicValue)
    code.extend_from_slice(&[0x8b, 0x48, 0x08]); // mov ecx, [rax+8] (DeviceID)
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    for _ in 0..4 {
        code.extend_from_slice(&[0x88, 0xd8, 0xee]); // mov al, bl; out dx, al
        code.extend_from_slice(&[0xc1, 0xeb, 0x08]); // shr ebx, 8
    }
    code.extend_from_slice(&[0x88, 0xc8, 0x04, b'0', 0xee, HLT]); // mov al, cl; add al, '0'; out
    let dir = util::scratch("vsock");
    let uds = dir.join("v.sock");
    let console = Captured::default();
    let spec = MachineSpec {
        irqchip: true,
        vsock: Some(kiln::vmm::VsockSpec {
            cid: 3,
            uds_path: uds.clone(),
        }),
        ..MachineSpec::raw(code, LOAD_ADDR, CpuMode::Long, Box::new(console.clone()))
    };
    let vmm = Vmm::build(spec).unwrap();
    assert!(uds.exists(), "the vsock device listens on its socket");
    // With an irqchip HLT waits for an interrupt; stop the VM once the guest has printed.
    assert_eq!(
        run_until(vmm, &console, 5),
        GuestExit::Stopped,
        "console: {:?}",
        console.text()
    );
    // 19 + '0' = 'C'.
    assert_eq!(console.text(), "virtC");
    std::fs::remove_dir_all(dir).unwrap();
}
