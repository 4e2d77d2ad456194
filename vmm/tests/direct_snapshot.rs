//! Direct-path snapshot tests: a hand-made guest is snapshotted in the middle of a long
//! computation, and a VM restored from that snapshot finishes it with the right result
//! without starting over.

use std::path::PathBuf;

use kiln::arch::x86_64::regs::CpuMode;
use kiln::snapshot::restore::RestoreSpec;
use kiln::snapshot::SnapshotKind;
use kiln::vmm::{GuestExit, MachineSpec, Vmm};

mod util;
use util::console::{snapshot, Captured};
use util::scratch;

/// Iterations of the guest's loop: long enough (a second or so on this machine's PVM
/// /dev/kvm, which emulates such code) that the snapshot lands in the middle of it. If it
/// did not, the test fails: a halted vCPU cannot pause, and a snapshot taken during the
/// printing would restore a partial result.
const N: u64 = 1 << 20;

/// 64-bit code that prints 'S' and sets rcx = N, rbx = 0: how both guests start their sum.
fn start_summing() -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    code.extend_from_slice(&[0xb0, b'S', 0xee]); // mov al, 'S'; out dx, al
    code.extend_from_slice(&[0x48, 0xb9]); // mov rcx, N
    code.extend_from_slice(&N.to_le_bytes());
    code.extend_from_slice(&[0x48, 0x31, 0xdb]); // xor rbx, rbx
    code
}

/// Appends code that prints rbx's 8 bytes and 'E', then halts.
fn print_rbx_and_halt(code: &mut Vec<u8>) {
    for _ in 0..8 {
        code.extend_from_slice(&[0x88, 0xd8, 0xee]); // mov al, bl; out dx, al
        code.extend_from_slice(&[0x48, 0xc1, 0xeb, 0x08]); // shr rbx, 8
    }
    code.extend_from_slice(&[0xb0, b'E', 0xee, 0xf4]); // mov al, 'E'; out dx, al; hlt
}

/// 64-bit code: print 'S', sum N..1 into rbx, print rbx's 8 bytes and 'E', halt.
fn summing_guest() -> Vec<u8> {
    let mut code = start_summing();
    code.extend_from_slice(&[0x48, 0x01, 0xcb]); // loop: add rbx, rcx
    code.extend_from_slice(&[0x48, 0xff, 0xc9]); // dec rcx
    code.extend_from_slice(&[0x75, 0xf8]); // jnz loop
    print_rbx_and_halt(&mut code);
    code
}

fn expected_output() -> Vec<u8> {
    let sum = N * (N + 1) / 2;
    let mut out = sum.to_le_bytes().to_vec();
    out.push(b'E');
    out
}

/// Where the two-phase guest keeps its phase-1 result.
const RESULT_ADDR: u32 = 0x20_0000;

/// 64-bit code in two phases. Phase 1: print 'S', sum N..1, storing the running sum at
/// RESULT_ADDR on every step. Phase 2: print 'M', count N down in registers only, then
/// print the 8 bytes at RESULT_ADDR and 'E', halt. A snapshot taken in phase 2 finds the
/// result only in memory, written after a snapshot taken in phase 1.
fn two_phase_guest() -> Vec<u8> {
    let mut code = start_summing();
    code.extend_from_slice(&[0x48, 0x01, 0xcb]); // loop1: add rbx, rcx
    code.extend_from_slice(&[0x48, 0x89, 0x1c, 0x25]); // mov [RESULT_ADDR], rbx
    code.extend_from_slice(&RESULT_ADDR.to_le_bytes());
    code.extend_from_slice(&[0x48, 0xff, 0xc9]); // dec rcx
    code.extend_from_slice(&[0x75, 0xf0]); // jnz loop1
    code.extend_from_slice(&[0x31, 0xdb]); // xor ebx, ebx (the result is in memory only)
    code.extend_from_slice(&[0xb0, b'M', 0xee]); // mov al, 'M'; out dx, al
    code.extend_from_slice(&[0x48, 0xb9]); // mov rcx, N
    code.extend_from_slice(&N.to_le_bytes());
    code.extend_from_slice(&[0x48, 0xff, 0xc9]); // loop2: dec rcx
    code.extend_from_slice(&[0x75, 0xfb]); // jnz loop2
    code.extend_from_slice(&[0x48, 0x8b, 0x1c, 0x25]); // mov rbx, [RESULT_ADDR]
    code.extend_from_slice(&RESULT_ADDR.to_le_bytes());
    print_rbx_and_halt(&mut code);
    code
}

fn spec(code: Vec<u8>, console: &Captured, track_dirty_pages: bool) -> MachineSpec {
    MachineSpec {
        track_dirty_pages,
        ..MachineSpec::raw(code, 0x1000, CpuMode::Long, Box::new(console.clone()))
    }
}

fn restore(dir: &std::path::Path) -> (GuestExit, Vec<u8>) {
    let console = Captured::default();
    let report = Vmm::restore(RestoreSpec::new(dir.to_owned(), Box::new(console.clone())))
        .unwrap()
        .run()
        .unwrap();
    (report.exit, console.bytes())
}

/// A diff snapshot taken in phase 2 holds the page phase 1 wrote (and little else), and a
/// restore of it layered over the phase-1 full snapshot prints the right result. On a
/// /dev/kvm without dirty page logging (this machine's PVM), the VM refuses to start with
/// tracking, saying why, and an untracked VM refuses a diff, saying why.
#[test]
fn snapshot_diff_layers_over_its_base() {
    let console = Captured::default();
    let vmm = match Vmm::build(spec(two_phase_guest(), &console, true)) {
        Ok(vmm) => vmm,
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains("refuses dirty page logging")
                    && message.contains("--track-dirty-pages"),
                "an unclear error: {message}"
            );
            eprintln!(
                "this /dev/kvm has no dirty page log ({message}); checking the refusals only"
            );
            let untracked = Vmm::build(spec(two_phase_guest(), &console, false)).unwrap();
            let controller = untracked.controller();
            let dir = scratch("diff-refused");
            let asker = std::thread::spawn(move || {
                let answer = snapshot(&controller, dir.clone(), SnapshotKind::Diff);
                assert!(
                    !dir.join("state").exists(),
                    "a refused diff left a state file"
                );
                answer
            });
            let _ = untracked.run();
            let refused = asker
                .join()
                .unwrap()
                .expect_err("a diff without tracking was taken");
            assert!(
                refused.to_string().contains("--track-dirty-pages"),
                "{refused}"
            );
            return;
        }
    };
    let (full, diff) = (scratch("base"), scratch("diff"));
    let controller = vmm.controller();
    let (watch, full_dir, diff_dir) = (console.clone(), full.clone(), diff.clone());
    let snapper = std::thread::spawn(move || {
        let snap = |dir: &PathBuf, kind| snapshot(&controller, dir.clone(), kind);
        watch.wait_for(1); // 'S': phase 1 runs
        let first = snap(&full_dir, SnapshotKind::Full);
        watch.wait_for(2); // 'M': phase 2 runs, the result is in memory only
        (first, snap(&diff_dir, SnapshotKind::Diff))
    });
    let original = vmm.run().unwrap();
    let (first, second) = snapper.join().unwrap();
    let (first, second) = (
        first.expect("full snapshot"),
        second.expect("diff snapshot"),
    );
    assert_eq!(original.exit, GuestExit::Halted);
    let full_bytes = first.memory_bytes_written;
    let diff_bytes = second.memory_bytes_written;
    eprintln!("full snapshot: {full_bytes} bytes of memory; diff: {diff_bytes}");
    assert!(
        diff_bytes > 0 && diff_bytes < full_bytes,
        "{first:?} {second:?}"
    );

    let (exit, out) = restore(&diff);
    assert_eq!(exit, GuestExit::Halted);
    assert_eq!(
        out,
        expected_output(),
        "base + diff restores the phase-1 result"
    );
    let (exit, out) = restore(&full);
    assert_eq!(exit, GuestExit::Halted);
    let mut want = vec![b'M'];
    want.extend(expected_output());
    assert_eq!(out, want, "the base alone resumes phase 1");

    // A base that changed after the diff was taken is refused, and named.
    let mut base = kiln::snapshot::read_state(&full).unwrap();
    base.vcpus[0].index = 0; // same content, but written anew: still the same digest
    kiln::snapshot::write_state(&full, &base).unwrap();
    let (exit, out) = restore(&diff);
    assert_eq!((exit, out), (GuestExit::Halted, expected_output()));
    base.devices.serial.interrupt_enable ^= 0x01;
    kiln::snapshot::write_state(&full, &base).unwrap();
    let refused = Vmm::restore(RestoreSpec::new(
        diff.clone(),
        Box::new(Captured::default()),
    ))
    .err()
    .expect("a diff over a changed base was restored")
    .to_string();
    assert!(
        refused.contains("has changed since the diff was taken")
            && refused.contains(full.to_str().unwrap()),
        "{refused}"
    );
    std::fs::remove_dir_all(&full).unwrap();
    std::fs::remove_dir_all(&diff).unwrap();
}

#[test]
fn snapshot_mid_computation_restores_and_finishes() {
    let dir = scratch("mid");
    let console = Captured::default();
    let spec = MachineSpec::raw(
        summing_guest(),
        0x1000,
        CpuMode::Long,
        Box::new(console.clone()),
    );
    let vmm = Vmm::build(spec).unwrap();
    let controller = vmm.controller();
    let (snap_console, snap_dir) = (console.clone(), dir.clone());
    let snapper = std::thread::spawn(move || {
        snap_console.wait_for(1); // the guest printed 'S': it is in its loop now
        snapshot(&controller, snap_dir, SnapshotKind::Full)
    });
    let original = vmm.run().unwrap();
    let answer = snapper.join().unwrap().expect("snapshot succeeded");
    assert_eq!(original.exit, GuestExit::Halted);
    let mut want = vec![b'S'];
    want.extend(expected_output());
    assert_eq!(console.bytes(), want, "the original run's result");
    assert!(answer.memory_bytes_written > 0, "{answer:?}");

    // The clone starts from the snapshot: it does not print 'S' again, and gets the sum.
    let restored_console = Captured::default();
    let restored = Vmm::restore(RestoreSpec::new(
        dir.clone(),
        Box::new(restored_console.clone()),
    ))
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
    Vmm::restore(RestoreSpec::new(dir.clone(), Box::new(again.clone())))
        .unwrap()
        .run()
        .unwrap();
    assert_eq!(again.bytes(), expected_output());
    std::fs::remove_dir_all(&dir).unwrap();
}
