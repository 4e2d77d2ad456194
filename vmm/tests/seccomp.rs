//! seccomp on the direct path: a vCPU thread that makes a syscall outside its filter kills
//! the process with SIGSYS, after one line saying which syscall and which thread. The VM
//! runs in a child process (this test binary run again, for one inner test), since the
//! kill takes the whole process.
//!
//! The syscall comes from an MMIO device the hand-made guest writes to: device emulation
//! runs on the vCPU thread, so that is where a compromised device model would make it.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::{Arc, Mutex};

use kiln::arch::x86_64::regs::CpuMode;
use kiln::vmm::{GuestExit, MachineSpec, Vmm};
use kiln_devices::BusDevice;

mod util;
use util::console::Captured;

/// Set in the child: the inner test runs the VM, with seccomp on if it is `on`.
const CHILD_ENV: &str = "KILN_SECCOMP_TEST_CHILD";
const MMIO_BASE: u64 = 0xc000_0000;

/// On a guest write, makes a syscall no vCPU thread needs (getppid).
struct Rogue;

impl BusDevice for Rogue {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _: u64, _: &[u8]) {
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() };
        eprintln!("rogue device: getppid returned {parent}");
    }
}

/// The child's part: a long-mode guest writes to the rogue device, then halts.
#[test]
fn child_vm_with_a_rogue_device() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return; // run directly: nothing to do
    };
    let mut code = vec![0x48, 0xb8];
    code.extend_from_slice(&MMIO_BASE.to_le_bytes()); // mov rax, MMIO_BASE
    code.extend_from_slice(&[0xc7, 0x00, 0x01, 0x00, 0x00, 0x00]); // mov dword [rax], 1
    code.push(0xf4); // hlt
    let spec = MachineSpec {
        extra_mmio: vec![(MMIO_BASE, 0x1000, Arc::new(Mutex::new(Rogue)))],
        seccomp: mode == "on",
        ..MachineSpec::raw(code, 0x1000, CpuMode::Long, Box::new(Captured::default()))
    };
    let report = Vmm::build(spec).unwrap().run().unwrap();
    assert_eq!(report.exit, GuestExit::Halted);
    eprintln!("child: the VM ran to its end");
}

fn run_child(mode: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_vm_with_a_rogue_device", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_ENV, mode)
        .output()
        .unwrap()
}

#[test]
fn seccomp_vcpu_syscall_outside_its_filter_kills_the_process() {
    let out = run_child("on");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "the child was not killed by SIGSYS: {:?}\n{stderr}",
        out.status
    );
    let line = format!(
        "kiln: seccomp: syscall {} is outside the filter of thread 'kiln-vcpu0'",
        libc::SYS_getppid
    );
    assert!(stderr.contains(&line), "no clear report line:\n{stderr}");
    assert!(
        !stderr.contains("rogue device: getppid returned"),
        "the syscall ran:\n{stderr}"
    );

    // The same VM without the filter runs to its end: the kill above was the filter's.
    let out = run_child("off");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}\n{stderr}", out.status);
    assert!(
        stderr.contains("rogue device: getppid returned")
            && stderr.contains("child: the VM ran to its end"),
        "{stderr}"
    );
}
