//! Direct-path tests of the ACPI tables kiln writes for a Linux boot. A VM is built (not
//! run) with a tiny ELF kernel, vsock and rng devices, and its guest memory is read as a
//! kernel reads it: the RSDP found by scanning the BIOS area and through the zero page,
//! every table's signature and checksum, the MADT's CPUs against --vcpus, the DSDT's
//! devices against the command line's, the e820 map around the tables.

use std::path::Path;
use std::time::Instant;

use kiln::arch::x86_64::layout::{
    ACPI_END, ACPI_START, CMDLINE_ADDR, CMDLINE_MAX_SIZE, IOAPIC_ADDR, MPTABLE_START, ZERO_PAGE,
};
use kiln::config::VmConfig;
use kiln::memory::GuestMemory;
use kiln::snapshot::restore::RestoreSpec;
use kiln::snapshot::SnapshotKind;
use kiln::vmm::{MachineSpec, Vmm, VsockSpec};
use vm_memory::{Bytes, GuestAddress};

mod util;
use util::console::{run_while, snapshot, Captured};
use util::scratch;

/// `struct boot_params` offsets: acpi_rsdp_addr, e820_entries, e820_table.
const ZP_ACPI_RSDP_ADDR: u64 = 0x70;
const ZP_E820_ENTRIES: u64 = 0x1e8;
const ZP_E820_TABLE: u64 = 0x2d0;
const E820_RESERVED: u32 = 2;
const E820_ACPI: u32 = 3;
/// FADT offsets: flags, X_DSDT; the hardware-reduced flag.
const FADT_FLAGS: usize = 112;
const FADT_X_DSDT: usize = 140;
const FADT_HW_REDUCED: u64 = 1 << 20;

fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    bytes
}

fn le(bytes: &[u8]) -> u64 {
    let mut value = [0u8; 8];
    value[..bytes.len()].copy_from_slice(bytes);
    u64::from_le_bytes(value)
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

/// The system description table at `addr`, checked: its length fits the ACPI range and
/// its bytes sum to zero.
fn table(mem: &GuestMemory, addr: u64) -> Vec<u8> {
    assert!(
        (ACPI_START..ACPI_END).contains(&addr),
        "table at {addr:#x} outside the ACPI range"
    );
    let len = le(&read(mem, addr + 4, 4));
    assert!(addr + len <= ACPI_END, "table at {addr:#x} runs past 1 MiB");
    let bytes = read(mem, addr, usize::try_from(len).unwrap());
    assert_eq!(
        sum(&bytes),
        0,
        "checksum of {:?}",
        String::from_utf8_lossy(&bytes[..4])
    );
    bytes
}

/// Where Linux finds the RSDP without a hint: a 16-byte aligned "RSD PTR " in
/// 0xe0000..0x100000 whose first 20 bytes sum to zero.
fn scan_for_rsdp(mem: &GuestMemory) -> Option<u64> {
    (0xe_0000..0x10_0000u64).step_by(16).find(|addr| {
        let head = read(mem, *addr, 20);
        &head[..8] == b"RSD PTR " && sum(&head) == 0
    })
}

fn cmdline(mem: &GuestMemory) -> String {
    let bytes = read(mem, CMDLINE_ADDR, CMDLINE_MAX_SIZE);
    let end = bytes.iter().position(|b| *b == 0).unwrap();
    String::from_utf8(bytes[..end].to_vec()).unwrap()
}

/// (size, base, irq) of every `virtio_mmio.device=` on the command line.
fn cmdline_devices(line: &str) -> Vec<(u32, u32, u32)> {
    line.split_whitespace()
        .filter_map(|w| w.strip_prefix("virtio_mmio.device="))
        .map(|d| {
            let (size, rest) = d.split_once('@').unwrap();
            let (base, irq) = rest.split_once(':').unwrap();
            let size = size.parse().unwrap();
            let base = u32::from_str_radix(base.trim_start_matches("0x"), 16).unwrap();
            (size, base, irq.parse().unwrap())
        })
        .collect()
}

/// The zero page's e820 map: (addr, size, type).
fn e820(mem: &GuestMemory) -> Vec<(u64, u64, u32)> {
    let count = read(mem, ZERO_PAGE + ZP_E820_ENTRIES, 1)[0];
    (0..u64::from(count))
        .map(|i| {
            let e = read(mem, ZERO_PAGE + ZP_E820_TABLE + i * 20, 20);
            (
                le(&e[..8]),
                le(&e[8..16]),
                u32::try_from(le(&e[16..])).unwrap(),
            )
        })
        .collect()
}

/// A VM with `vcpus`, a vsock and an rng device, booting a tiny ELF kernel, built and not
/// run.
fn build(dir: &Path, vcpus: u8, acpi: bool) -> Vmm {
    build_listing(dir, vcpus, acpi, false)
}

/// [`build`], with the virtio devices in the DSDT instead of on the command line if
/// `acpi_devices`.
fn build_listing(dir: &Path, vcpus: u8, acpi: bool, acpi_devices: bool) -> Vmm {
    let mut config = VmConfig::new(util::tiny_kernel(dir, ""));
    config.vcpus = vcpus;
    config.memory_mib = 64;
    config.acpi = acpi;
    config.acpi_devices = acpi_devices;
    config.seccomp = false;
    let mut spec = MachineSpec::from_config(&config, Box::new(std::io::sink()), Instant::now());
    spec.vsock = Some(VsockSpec {
        cid: 3,
        uds_path: dir.join("vsock.sock"),
    });
    Vmm::build(spec).unwrap()
}

/// The MADT's entries: (type, bytes).
fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut entries = Vec::new();
    let mut at = 44;
    while at < madt.len() {
        let (kind, len) = (madt[at], usize::from(madt[at + 1]));
        assert!(
            len >= 2 && at + len <= madt.len(),
            "MADT entry at {at} is cut"
        );
        entries.push((kind, madt[at..at + len].to_vec()));
        at += len;
    }
    entries
}

fn check_tables(vcpus: u8, acpi_devices: bool) {
    let dir = scratch(&format!("acpi-{vcpus}-{acpi_devices}"));
    let vmm = build_listing(&dir, vcpus, true, acpi_devices);
    let mem = vmm.guest_memory();
    // The devices' windows and lines, as a VM built alike lists them on its command line.
    let listed = build(&scratch(&format!("acpi-{vcpus}-listed")), vcpus, true);
    let devices = cmdline_devices(&cmdline(listed.guest_memory()));
    assert_eq!(devices.len(), 2, "vsock and rng");

    // The RSDP: where the scan finds it, and where the zero page says it is.
    let rsdp_addr = scan_for_rsdp(mem).expect("no RSDP in 0xe0000..0x100000");
    assert_eq!(le(&read(mem, ZERO_PAGE + ZP_ACPI_RSDP_ADDR, 8)), rsdp_addr);
    let rsdp = read(mem, rsdp_addr, 36);
    assert_eq!(rsdp[15], 2, "an ACPI 2.0 RSDP, with an XSDT");
    assert_eq!(le(&rsdp[20..24]), 36);
    assert_eq!(sum(&rsdp), 0, "extended checksum");

    // The XSDT lists the FADT and the MADT; the FADT points at the DSDT.
    let xsdt = table(mem, le(&rsdp[24..32]));
    assert_eq!(&xsdt[..4], b"XSDT");
    let mut fadt = None;
    let mut madt = None;
    for entry in xsdt[36..].chunks(8) {
        let t = table(mem, le(entry));
        match &t[..4] {
            b"FACP" => fadt = Some(t),
            b"APIC" => madt = Some(t),
            other => panic!("unexpected table {:?}", String::from_utf8_lossy(other)),
        }
    }
    let (fadt, madt) = (fadt.expect("no FADT"), madt.expect("no MADT"));
    assert_ne!(le(&fadt[FADT_FLAGS..FADT_FLAGS + 4]) & FADT_HW_REDUCED, 0);
    let dsdt = table(mem, le(&fadt[FADT_X_DSDT..FADT_X_DSDT + 8]));
    assert_eq!(&dsdt[..4], b"DSDT");

    // The MADT: one enabled local APIC per vCPU, IDs 0..vcpus, and the IOAPIC.
    let entries = madt_entries(&madt);
    let apic_ids: Vec<u8> = entries
        .iter()
        .filter(|(kind, e)| *kind == 0 && le(&e[4..8]) & 1 == 1)
        .map(|(_, e)| e[3])
        .collect();
    assert_eq!(apic_ids, (0..vcpus).collect::<Vec<_>>());
    let ioapics: Vec<u64> = entries
        .iter()
        .filter(|(kind, _)| *kind == 1)
        .map(|(_, e)| le(&e[4..8]))
        .collect();
    assert_eq!(ioapics, [u64::from(IOAPIC_ADDR)]);

    // Each device is announced one way only: on the command line, or in the DSDT as
    // LNRO0005 with its window as a Memory32Fixed descriptor and its line as an
    // edge-triggered, active-high interrupt.
    let line = cmdline(mem);
    let hids = dsdt.windows(8).filter(|w| *w == b"LNRO0005").count();
    if !acpi_devices {
        assert_eq!(cmdline_devices(&line), devices);
        assert_eq!(
            hids, 0,
            "devices in the DSDT as well as on the command line"
        );
    } else {
        assert_eq!(
            cmdline_devices(&line),
            [],
            "devices on the command line: {line}"
        );
        assert_eq!(hids, devices.len());
    }
    for (size, base, irq) in devices.into_iter().filter(|_| acpi_devices) {
        let mut window = vec![0x86, 0x09, 0x00, 0x01];
        window.extend_from_slice(&base.to_le_bytes());
        window.extend_from_slice(&size.to_le_bytes());
        assert!(
            dsdt.windows(window.len()).any(|w| w == window),
            "no window {base:#x} in the DSDT"
        );
        let mut interrupt = vec![0x89, 0x06, 0x00, 0x03, 0x01];
        interrupt.extend_from_slice(&irq.to_le_bytes());
        assert!(
            dsdt.windows(interrupt.len()).any(|w| w == interrupt),
            "no interrupt {irq} in the DSDT"
        );
        // ISA lines get an override saying edge/active high, to the same GSI.
        if irq < 16 {
            assert!(entries.iter().any(|(kind, e)| *kind == 2
                && u32::from(e[3]) == irq
                && le(&e[4..8]) == u64::from(irq)
                && le(&e[8..10]) == 0b0101));
        }
    }
    assert!(dsdt.windows(4).any(|w| w == b"COM1"));

    // Every table lies in one e820 range that is reserved (or ACPI data), never RAM.
    let map = e820(mem);
    let end = [&xsdt, &fadt, &madt, &dsdt]
        .iter()
        .map(|t| t.len() as u64)
        .sum::<u64>()
        + rsdp_addr;
    assert!(
        map.iter().any(|(addr, size, kind)| {
            (*kind == E820_RESERVED || *kind == E820_ACPI)
                && *addr <= rsdp_addr
                && addr + size >= end.min(ACPI_END)
        }),
        "no reserved e820 range over the tables: {map:x?}"
    );
    assert_eq!(
        &read(mem, MPTABLE_START, 4),
        b"_MP_",
        "the MP table is kept"
    );
}

#[test]
fn acpi_tables_describe_one_vcpu_and_the_devices_on_the_command_line() {
    check_tables(1, false);
}

#[test]
fn acpi_tables_describe_three_vcpus_and_the_devices_in_the_dsdt() {
    check_tables(3, true);
}

#[test]
fn no_acpi_leaves_the_tables_out_and_keeps_the_mp_table() {
    let dir = scratch("acpi-off");
    let vmm = build(&dir, 2, false);
    let mem = vmm.guest_memory();
    assert_eq!(scan_for_rsdp(mem), None);
    assert_eq!(le(&read(mem, ZERO_PAGE + ZP_ACPI_RSDP_ADDR, 8)), 0);
    assert_eq!(&read(mem, MPTABLE_START, 4), b"_MP_");
    assert_eq!(cmdline_devices(&cmdline(mem)).len(), 2);
}

/// A guest that overwrites the first byte of the RSDP's OEM ID with 'Q', prints 'S' and
/// spins; snapshotted and restored, its memory still has the 'Q': a restore does not
/// write the tables again.
#[test]
fn a_restore_leaves_the_tables_as_the_guest_left_them() {
    let dir = scratch("acpi-restore");
    let oem_byte = u32::try_from(ACPI_START + 9).unwrap();
    let mut code = vec![0xc6, 0x04, 0x25]; // mov byte [oem_byte], 'Q'
    code.extend_from_slice(&oem_byte.to_le_bytes());
    code.push(b'Q');
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    code.extend_from_slice(&[0xb0, b'S', 0xee]); // mov al, 'S'; out dx, al
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp $
    let kernel = dir.join("poke.elf");
    std::fs::write(&kernel, kiln_tests::tiny_kernel::elf(&code)).unwrap();

    let mut config = VmConfig::new(&kernel);
    config.memory_mib = 64;
    config.seccomp = false;
    config.rng = false;
    let console = Captured::default();
    let spec = MachineSpec::from_config(&config, Box::new(console.clone()), Instant::now());
    let vmm = Vmm::build(spec).unwrap();
    assert_eq!(read(vmm.guest_memory(), ACPI_START + 9, 1), b"K");
    let snap = dir.join("snap");
    let target = snap.clone();
    let (_, taken) = run_while(vmm, &console, move |controller| {
        snapshot(controller, target, SnapshotKind::Full)
    });
    taken.expect("snapshot");

    let restored = Vmm::restore(RestoreSpec::new(snap, Box::new(std::io::sink()))).unwrap();
    let mem = restored.guest_memory();
    assert_eq!(read(mem, ACPI_START + 9, 1), b"Q");
    assert_eq!(
        scan_for_rsdp(mem),
        None,
        "the guest's byte broke the checksum"
    );
}
