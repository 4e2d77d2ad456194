//! Hostile guests on the direct path: hand-made guests abuse the virtio devices'
//! MMIO windows and rings. kiln ignores what is out of protocol (with a log line), marks a
//! device whose rings are corrupt DEVICE_NEEDS_RESET, answers bad requests with an error,
//! and never panics; the VMM, the other devices and the host keep working.
//!
//! This file: the vsock device in-process, with the host socket checked while the VM runs.
//! `net`: the net device in-process, on a TAP in a network namespace of the test's own.
//! `mmio`, `vsock`, `block` and `rng`: `kiln run` end to end (seccomp on), one guest per case.

use std::time::{Duration, Instant};

use kiln::arch::x86_64::regs::CpuMode;
use kiln::vmm::{GuestExit, MachineSpec, Vmm, VsockSpec};

#[path = "../util/mod.rs"]
mod util;
use util::console::Captured;

mod block;
mod flood;
mod guest;
mod mmio;
mod net;
mod rng;
mod vsock;

use guest::{reg, Code, Rings};

/// The hostile driver of the device in the first window, whose queues are at `rings`;
/// queue 1 (tx, for both vsock and net) is the one it corrupts.
fn hostile_guest(rings: &[Rings]) -> Vec<u8> {
    let mut c = Code::new(guest::VSOCK);
    // Out of protocol: notify, ready and an absurd size before any negotiation, a write
    // past the config space, DRIVER_OK out of order; then a reset.
    c.write(reg::QUEUE_NOTIFY, 1)
        .write(reg::QUEUE_READY, 1)
        .write(reg::QUEUE_NUM, 0xffff)
        .write(0x1f0, 0xdead_beef)
        .write(reg::STATUS, 0x04)
        .write(reg::STATUS, 0);
    // By the book: ACKNOWLEDGE, DRIVER, VERSION_1, FEATURES_OK, the queues, DRIVER_OK;
    // prints 0x0f (live).
    c.bring_up(rings);
    // The tx queue's avail index jumps 200 entries ahead of a ring of 8: prints 0x4f
    // (DEVICE_NEEDS_RESET).
    c.corrupt_avail(rings[1], 1);
    // A reset brings the device back to the start of the protocol: prints 0x00, then 'K'.
    c.write(reg::STATUS, 0).print_status().print(b'K');
    c.halt()
}

#[test]
fn hostile_rings_mark_the_device_broken_and_nothing_else() {
    let dir = util::scratch("in-process");
    let uds = dir.join("v.sock");
    let console = Captured::default();
    let spec = MachineSpec {
        irqchip: true,
        vsock: Some(VsockSpec {
            cid: 3,
            uds_path: uds.clone(),
        }),
        ..MachineSpec::raw(
            hostile_guest(&vsock::RINGS),
            0x1000,
            CpuMode::Long,
            Box::new(console.clone()),
        )
    };
    let vmm = Vmm::build(spec).unwrap();
    // The host side still works while the VM runs: the socket takes a connection.
    let host_connected = run_hostile(vmm, &console, || {
        std::os::unix::net::UnixStream::connect(&uds).is_ok()
    });
    assert!(host_connected, "the vsock socket stopped accepting");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What [`hostile_guest`] prints: the status after DRIVER_OK, after the corrupt ring, after
/// the reset; then 'K', as the serial port still works.
const HOSTILE_OUTPUT: [u8; 4] = [0x0f, 0x4f, 0x00, b'K'];

/// Runs `vmm` (with an irqchip HLT waits for an interrupt) until the guest has printed
/// [`HOSTILE_OUTPUT`]'s four bytes, or a minute has passed; calls `meanwhile` while the VM
/// still runs, stops it and checks what the guest printed. Returns what `meanwhile` said.
fn run_hostile<T: Send>(vmm: Vmm, console: &Captured, meanwhile: impl FnOnce() -> T + Send) -> T {
    let stop = vmm.stop_handle().unwrap();
    let watcher = console.clone();
    let said = std::thread::scope(|s| {
        let waiter = s.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while watcher.bytes().len() < HOSTILE_OUTPUT.len() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10)); // polling the console's length
            }
            let said = meanwhile();
            stop.stop();
            said
        });
        let report = vmm.run().expect("the VMM survives a hostile guest");
        assert_eq!(report.exit, GuestExit::Stopped);
        waiter.join().unwrap()
    });
    assert_eq!(
        console.bytes(),
        HOSTILE_OUTPUT,
        "status after DRIVER_OK, after the corrupt ring, after the reset; then the serial \
         port still works"
    );
    said
}
