//! The net device's hostile driver, on a TAP in a network namespace of the test's own: a
//! corrupt tx avail ring marks the device DEVICE_NEEDS_RESET, a reset brings it back, and
//! the serial port keeps working.

use kiln::arch::x86_64::regs::CpuMode;
use kiln::vmm::{MachineSpec, Vmm};
use kiln_devices::virtio::net::tap;

use super::{hostile_guest, run_hostile, vsock};
use crate::util::console::Captured;
use crate::util::netns::in_netns;

#[test]
fn hostile_net_rings_mark_the_device_broken_and_nothing_else() {
    in_netns(|| {
        tap::create_persistent("kh0", None).unwrap();
        let console = Captured::default();
        let spec = MachineSpec {
            irqchip: true,
            net: Some("tap=kh0".parse().unwrap()),
            // rx and tx: the net device's two queues, where the vsock guest puts its first two.
            ..MachineSpec::raw(
                hostile_guest(&vsock::RINGS[..2]),
                0x1000,
                CpuMode::Long,
                Box::new(console.clone()),
            )
        };
        run_hostile(Vmm::build(spec).unwrap(), &console, || ());
    });
}
