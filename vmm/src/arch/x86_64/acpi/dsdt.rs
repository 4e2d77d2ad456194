//! The DSDT: the devices a kernel cannot find by itself, under `\_SB`. COM1 (`PNP0501`)
//! with its ports and line, and each virtio-mmio device (`LNRO0005`, the ID Linux's
//! virtio_mmio driver matches) with its register window and line.

use acpi_tables::aml::{
    self, Device, EISAName, Interrupt, Memory32Fixed, Name, Path, ResourceTemplate, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::{AcpiError, Machine, MmioDevice, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// DSDT revision 2: integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
const SDT_HEADER_LEN: u32 = 36;
/// The `_HID` Linux's virtio_mmio driver binds to.
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";

/// The DSDT for `machine`.
pub(super) fn build(machine: &Machine) -> Result<Sdt, AcpiError> {
    let mut body = Vec::new();
    let serial = serial(machine.serial.0, machine.serial.1);
    let virtio = machine
        .virtio
        .iter()
        .enumerate()
        .map(|(index, device)| virtio(index, device))
        .collect::<Result<Vec<_>, _>>()?;
    let mut children: Vec<&dyn Aml> = vec![&serial];
    children.extend(virtio.iter().map(|d| d as &dyn Aml));
    aml::Scope::new(Path::new("_SB_"), children).to_aml_bytes(&mut body);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    Ok(dsdt)
}

/// A device node written out: its AML bytes.
struct Node(Vec<u8>);

impl Aml for Node {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// `Device (COM1)`: the 8250 UART at `port` (8 ports) on ISA line `irq`.
fn serial(port: u16, irq: u32) -> Node {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0501"));
    let uid = Name::new(Path::new("_UID"), &aml::ZERO);
    let io = IO::new(port, port, 1, 8);
    let line = Interrupt::new(true, true, false, false, irq);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&io, &line]));
    let mut bytes = Vec::new();
    Device::new(Path::new("COM1"), vec![&hid, &uid, &crs]).to_aml_bytes(&mut bytes);
    Node(bytes)
}

/// `Device (Vnnn)`: the `index`th virtio-mmio device, its window and its edge-triggered,
/// active-high line (as kiln signals it through an irqfd).
fn virtio(index: usize, device: &MmioDevice) -> Result<Node, AcpiError> {
    let base = u32::try_from(device.base).map_err(|_| AcpiError::WindowAbove4G(device.base))?;
    let size = u32::try_from(device.size).map_err(|_| AcpiError::WindowAbove4G(device.base))?;
    let hid = Name::new(Path::new("_HID"), &VIRTIO_MMIO_HID);
    let uid_value = u32::try_from(index).unwrap_or(u32::MAX);
    let uid = Name::new(Path::new("_UID"), &uid_value);
    let window = Memory32Fixed::new(true, base, size);
    let line = Interrupt::new(true, true, false, false, device.irq);
    let crs = Name::new(
        Path::new("_CRS"),
        &ResourceTemplate::new(vec![&window, &line]),
    );
    let name = format!("V{index:03X}");
    let mut bytes = Vec::new();
    Device::new(Path::new(&name), vec![&hid, &uid, &crs]).to_aml_bytes(&mut bytes);
    Ok(Node(bytes))
}
