//! MMIO accesses out of protocol, on both virtio devices' windows: notifications and queue
//! settings before negotiation, notifications for queues that do not exist, writes to
//! read-only registers, accesses of odd sizes and alignments, accesses past the register
//! window, and queue and feature writes after DRIVER_OK. Each is ignored; the devices then
//! come up and work.

use crate::guest::{self, reg, Code, BLOCK, VSOCK};
use crate::{block, vsock};

/// The abuse, on the window in rdi, ending with prints: status (0: nothing took), the
/// magic's low byte ('v'), then after bringing the device up, the status (0x0f), and after
/// the post-DRIVER_OK writes, queue 0's size (8), ready (1) and the status (0x0f).
fn abuse(c: &mut Code, rings: &[guest::Rings]) {
    for (off, value) in [
        (reg::QUEUE_NOTIFY, 0),
        (reg::QUEUE_NOTIFY, 99),
        (reg::QUEUE_READY, 1),
        (reg::QUEUE_NUM, 0xffff),
        (reg::DRIVER_FEATURES, u32::MAX),
        (reg::MAGIC, 0x1234_5678),
        (reg::VERSION, 1),
        (reg::DEVICE_ID, 0),
        (reg::QUEUE_NUM_MAX, 0xffff),
        (reg::INTERRUPT_STATUS, u32::MAX),
        (reg::CONFIG_GENERATION, 7),
        (reg::STATUS + 1, 0x0f), // misaligned
        (reg::CONFIG, u32::MAX), // config space: read-only for both devices
        (0x200, 1),              // past the window, inside its 4 KiB slot
        (0x800, 1),
        (0xffc, 1),
        (0x1fe, 0x0f0f_0f0f), // straddles the window's end
    ] {
        c.write(off, value);
    }
    c.write_sized(reg::STATUS, 1, 0x0f)
        .write_sized(reg::QUEUE_SEL, 2, 1)
        .write_sized(reg::QUEUE_DESC_LOW, 8, 0x1000)
        .write_sized(reg::CONFIG + 0xfc, 8, 0) // 8 bytes from 4 before the end
        .read_sized(reg::MAGIC, 1)
        .read_sized(reg::STATUS, 2)
        .read_sized(reg::STATUS + 2, 4)
        .read_sized(reg::QUEUE_DESC_LOW, 8)
        .read_sized(0x400, 4)
        .read_sized(0x1fe, 4);
    c.print_status().print_reg(reg::MAGIC);
    c.bring_up(rings);
    c.write(reg::QUEUE_SEL, 7) // no such queue
        .write(reg::QUEUE_NUM, 4)
        .write(reg::QUEUE_SEL, 0)
        .write(reg::QUEUE_NUM, 2)
        .write(reg::QUEUE_DESC_LOW, 0x5000)
        .write(reg::QUEUE_DESC_HIGH, 0xdead)
        .write(reg::QUEUE_READY, 0)
        .write(reg::DRIVER_FEATURES_SEL, 0)
        .write(reg::DRIVER_FEATURES, u32::MAX)
        .write(reg::STATUS, 0x01) // clears bits
        .write(reg::STATUS, 0x4f); // sets the device-only DEVICE_NEEDS_RESET
    c.print_reg(reg::QUEUE_NUM)
        .print_reg(reg::QUEUE_READY)
        .print_status();
}

#[test]
fn hostile_mmio_accesses_out_of_protocol_are_ignored() {
    let mut c = Code::new(VSOCK);
    abuse(&mut c, &vsock::RINGS);
    c.window(BLOCK);
    abuse(&mut c, &[block::RINGS]);
    // Both devices work, so does the serial port, and kiln exits cleanly.
    block::probe(&mut c, 0);
    vsock::probe(&mut c, 0);
    c.print(b'K');
    let out = guest::run("mmio", &c.reset_vm());

    let per_device = [0x00, b'v', 0x0f, 8, 1, 0x0f];
    let mut want = [per_device, per_device].concat();
    want.extend([0, guest::DISK_BYTE, vsock::RST, b'K']);
    assert_eq!(out.console, want, "log:\n{}", out.log);
    for line in [
        "notification for a queue that does not exist",
        "write to a read-only or unknown register ignored",
        "queue register written outside queue set-up",
        "DriverFeatures written outside negotiation",
        "register write not 32 bits wide",
        "misaligned register write ignored",
        "driver tried to clear status bits",
    ] {
        assert!(
            out.log.contains(line),
            "no {line:?} in the log:\n{}",
            out.log
        );
    }
}

/// Rings outside guest memory: DRIVER_OK is refused and the device shows
/// DEVICE_NEEDS_RESET (0x4b: FEATURES_OK | DRIVER | ACKNOWLEDGE | NEEDS_RESET); a reset and
/// a proper set-up bring it up.
#[test]
fn hostile_mmio_rings_outside_memory_are_refused_at_driver_ok() {
    let mut c = Code::new(VSOCK);
    for (window, rings) in [(VSOCK, &vsock::RINGS[..]), (BLOCK, &[block::RINGS][..])] {
        c.window(window)
            .negotiate()
            .queues(rings)
            .write(reg::QUEUE_SEL, 0)
            .write(reg::QUEUE_DESC_HIGH, 0xdead)
            .write(reg::STATUS, 0x0f)
            .print_status()
            .bring_up(rings);
    }
    block::probe(&mut c, 0);
    vsock::probe(&mut c, 0);
    c.print(b'K');
    let out = guest::run("rings", &c.reset_vm());

    let want = [
        0x4b,
        0x0f,
        0x4b,
        0x0f,
        0,
        guest::DISK_BYTE,
        vsock::RST,
        b'K',
    ];
    assert_eq!(out.console, want, "log:\n{}", out.log);
    assert!(out.log.contains("DRIVER_OK refused"), "{}", out.log);
}
