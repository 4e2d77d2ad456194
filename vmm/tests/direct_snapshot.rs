//! Direct-path snapshot tests: a hand-made guest is snapshotted in the middle of a long
//! computation, and a VM restored from that snapshot finishes it with the right result
//! without starting over.

use std::path::PathBuf;
use std::time::Instant;

use kiln::arch::x86_64::regs::CpuMode;
use kiln::snapshot::restore::RestoreSpec;
use kiln::vmm::{BootSource, GuestExit, MachineSpec, Request, Vmm};

mod console_capture;
use console_capture::Captured;

/// Iterations of the guest's loop: long enough (a second or so on this machine's PVM
/// /dev/kvm, which emulates such code) that the snapshot lands in the middle of it. If it
/// did not, the test fails: a halted vCPU cannot pause, and a snapshot taken during the
/// printing would restore a partial result.
const N: u64 = 1 << 20;

/// 64-bit code: print 'S', sum N..1 into rax, print rax's 8 bytes and 'E', halt.
fn summing_guest() -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    code.extend_from_slice(&[0xb0, b'S', 0xee]); // mov al, 'S'; out dx, al
    code.extend_from_slice(&[0x48, 0xb9]); // mov rcx, N
    code.extend_from_slice(&N.to_le_bytes());
    code.extend_from_slice(&[0x48, 0x31, 0xdb]); // xor rbx, rbx
    code.extend_from_slice(&[0x48, 0x01, 0xcb]); // loop: add rbx, rcx
    code.extend_from_slice(&[0x48, 0xff, 0xc9]); // dec rcx
    code.extend_from_slice(&[0x75, 0xf8]); // jnz loop
    for _ in 0..8 {
        code.extend_from_slice(&[0x88, 0xd8, 0xee]); // mov al, bl; out dx, al
        code.extend_from_slice(&[0x48, 0xc1, 0xeb, 0x08]); // shr rbx, 8
    }
    code.extend_from_slice(&[0xb0, b'E', 0xee, 0xf4]); // mov al, 'E'; out dx, al; hlt
    code
}

fn expected_output() -> Vec<u8> {
    let sum = N * (N + 1) / 2;
    let mut out = sum.to_le_bytes().to_vec();
    out.push(b'E');
    out
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-direct-snap-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn snapshot_mid_computation_restores_and_finishes() {
    let dir = scratch("mid");
    let console = Captured::default();
    let spec = MachineSpec {
        vcpus: 1,
        memory_mib: 16,
        boot: BootSource::Raw {
            code: summing_guest(),
            load_addr: 0x1000,
            mode: CpuMode::Long,
        },
        console: Box::new(console.clone()),
        irqchip: false,
        extra_mmio: Vec::new(),
        start: Instant::now(),
        vsock: None,
        boot_done: None,
        snapshot_on_request: None,
    };
    let vmm = Vmm::build(spec).unwrap();
    let controller = vmm.controller();
    let (snap_console, snap_dir) = (console.clone(), dir.clone());
    let snapper = std::thread::spawn(move || {
        snap_console.wait_for(1); // the guest printed 'S': it is in its loop now
        controller.call(Request::Snapshot {
            dir: snap_dir,
            resume: true,
        })
    });
    let original = vmm.run().unwrap();
    let answer = snapper.join().unwrap().expect("snapshot succeeded");
    assert_eq!(original.exit, GuestExit::Halted);
    let mut want = vec![b'S'];
    want.extend(expected_output());
    assert_eq!(console.bytes(), want, "the original run's result");
    assert!(
        answer["memory_bytes_written"].as_u64().unwrap() > 0,
        "{answer}"
    );

    // The clone starts from the snapshot: it does not print 'S' again, and gets the sum.
    let restored_console = Captured::default();
    let restored = Vmm::restore(RestoreSpec {
        snapshot: dir.clone(),
        console: Box::new(restored_console.clone()),
        vsock_uds: None,
        start: Instant::now(),
        boot_done: None,
    })
    .unwrap()
    .run()
    .unwrap();
    assert_eq!(restored.exit, GuestExit::Halted);
    assert_eq!(
        restored_console.bytes(),
        expected_output(),
        "the restored run's result"
    );

    // A second restore of the same snapshot gives the same (the snapshot is unchanged).
    let again = Captured::default();
    Vmm::restore(RestoreSpec {
        snapshot: dir.clone(),
        console: Box::new(again.clone()),
        vsock_uds: None,
        start: Instant::now(),
        boot_done: None,
    })
    .unwrap()
    .run()
    .unwrap();
    assert_eq!(again.bytes(), expected_output());
    std::fs::remove_dir_all(&dir).unwrap();
}
