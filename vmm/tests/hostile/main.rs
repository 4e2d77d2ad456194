//! Hostile guests on the direct path (issue 7): hand-made guests abuse the virtio devices'
//! MMIO windows and rings. kiln ignores what is out of protocol (with a log line), marks a
//! device whose rings are corrupt DEVICE_NEEDS_RESET, answers bad requests with an error,
//! and never panics; the VMM, the other devices and the host keep working.
//!
//! This file: the vsock device in-process, with the host socket checked while the VM runs.
//! `mmio`, `vsock` and `block`: `kiln run` end to end (seccomp on), one guest per case.

use std::time::{Duration, Instant};

use kiln::arch::x86_64::regs::CpuMode;
use kiln::vmm::{GuestExit, MachineSpec, Vmm, VsockSpec};

#[path = "../console_capture/mod.rs"]
mod console_capture;
use console_capture::Captured;

mod block;
mod guest;
mod mmio;
mod vsock;

use guest::{reg, Code, Rings};

fn hostile_guest() -> Vec<u8> {
    let mut c = Code::new(guest::VSOCK);
    // Out of protocol: notify, ready and an absurd size before any negotiation, a write
    // past the config space, DRIVER_OK out of order; then a reset.
    c.write(reg::QUEUE_NOTIFY, 1)
        .write(reg::QUEUE_READY, 1)
        .write(reg::QUEUE_NUM, 0xffff)
        .write(0x1f0, 0xdead_beef)
        .write(reg::STATUS, 0x04)
        .write(reg::STATUS, 0);
    // By the book: ACKNOWLEDGE, DRIVER, VERSION_1, FEATURES_OK, three queues, DRIVER_OK;
    // prints 0x0f (live).
    c.bring_up(&vsock::RINGS);
    // The tx queue's avail index jumps 200 entries ahead of a ring of 8: prints 0x4f
    // (DEVICE_NEEDS_RESET).
    let tx: Rings = vsock::RINGS[1];
    c.poke16(tx.avail() + 2, 200)
        .write(reg::QUEUE_NOTIFY, 1)
        .wait_needs_reset()
        .print_status();
    // A reset brings the device back to the start of the protocol: prints 0x00, then 'K'.
    c.write(reg::STATUS, 0).print_status().print(b'K');
    c.halt()
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
            hostile_guest(),
            0x1000,
            CpuMode::Long,
            Box::new(console.clone()),
        )
    };
    let vmm = Vmm::build(spec).unwrap();
    // With an irqchip HLT waits for an interrupt: stop the VM once the guest has printed
    // its four bytes, or after a minute (then the output below says how far it got).
    let stop = vmm.stop_handle().unwrap();
    let (watcher, host_uds) = (console.clone(), uds.clone());
    let waiter = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while watcher.bytes().len() < 4 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10)); // polling the console's length
        }
        // The host side still works while the VM runs: the socket takes a connection.
        let connected = std::os::unix::net::UnixStream::connect(&host_uds).is_ok();
        stop.stop();
        connected
    });
    let report = vmm.run().expect("the VMM survives a hostile guest");
    let host_connected = waiter.join().unwrap();
    assert_eq!(report.exit, GuestExit::Stopped);
    assert_eq!(
        console.bytes(),
        vec![0x0f, 0x4f, 0x00, b'K'],
        "status after DRIVER_OK, after the corrupt ring, after the reset; then the serial \
         port still works"
    );
    assert!(host_connected, "the vsock socket stopped accepting");
    std::fs::remove_dir_all(&dir).unwrap();
}
