use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn table(mem: &GuestMemoryMmap<()>, addr: u64) -> Vec<u8> {
    let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
    let mut bytes = vec![0u8; len as usize];
    mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    bytes
}

/// 1 MiB of memory with the tables for `vcpus` and `count` virtio devices written into it.
fn written(vcpus: u8, count: u32) -> (GuestMemoryMmap<()>, Result<GuestAddress, AcpiError>) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let virtio: Vec<MmioDevice> = (0..count)
        .map(|i| MmioDevice {
            base: 0xd000_0000 + u64::from(i) * 0x1000,
            size: 0x200,
            irq: 5 + i,
        })
        .collect();
    let machine = Machine {
        vcpus,
        serial: (0x3f8, 4),
        virtio: &virtio,
    };
    let result = write(&mem, &machine);
    (mem, result)
}

#[test]
fn every_table_sums_to_zero_and_the_xsdt_lists_fadt_and_madt() {
    let (mem, rsdp) = written(4, 3);
    let rsdp = rsdp.unwrap();
    assert_eq!(rsdp, GuestAddress(ACPI_START));
    let mut head = [0u8; 36];
    mem.read_slice(&mut head, rsdp).unwrap();
    assert_eq!(&head[..8], b"RSD PTR ");
    assert_eq!(sum(&head[..20]), 0);
    assert_eq!(sum(&head), 0);
    let xsdt_addr = u64::from_le_bytes(head[24..32].try_into().unwrap());
    let xsdt = table(&mem, xsdt_addr);
    assert_eq!(&xsdt[..4], b"XSDT");
    assert_eq!(sum(&xsdt), 0);
    let entries: Vec<u64> = xsdt[36..]
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let signatures: Vec<Vec<u8>> = entries
        .iter()
        .map(|a| {
            let t = table(&mem, *a);
            assert_eq!(sum(&t), 0, "{:?}", &t[..4]);
            assert!(*a + t.len() as u64 <= ACPI_END);
            t[..4].to_vec()
        })
        .collect();
    assert_eq!(signatures, [b"FACP".to_vec(), b"APIC".to_vec()]);
    let fadt = table(&mem, entries[0]);
    let dsdt = table(&mem, u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
    assert_eq!(&dsdt[..4], b"DSDT");
    assert_eq!(sum(&dsdt), 0);
    let hids = dsdt.windows(8).filter(|w| *w == b"LNRO0005").count();
    assert_eq!(hids, 3);
}

#[test]
fn too_many_devices_for_the_region_is_an_error() {
    let err = written(1, 4000).1.unwrap_err();
    assert!(matches!(err, AcpiError::TooLarge { .. }), "{err}");
}
