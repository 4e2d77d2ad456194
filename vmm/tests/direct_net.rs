//! The network device on the direct path: a hand-made guest cannot drive virtio-net, so
//! these check what the VMM does around it — the device on the MMIO bus with its MAC in the
//! config space, its state in snapshots, and restores that each need their own TAP.
//!
//! Each test runs in a network namespace of its own (a thread that unshares one), so the
//! TAPs it creates never touch the machine's network and vanish with the test.

use kiln::arch::x86_64::regs::CpuMode;
use kiln::net::NetConfig;
use kiln::snapshot::restore::RestoreSpec;
use kiln::snapshot::SnapshotKind;
use kiln::vmm::{GuestExit, MachineSpec, Vmm};
use kiln_devices::virtio::net::{tap, MacAddr};

mod util;
use util::console::{run_until, run_while, snapshot, Captured, PRINT_AND_SPIN};
use util::netns::in_netns;

const LOAD_ADDR: u64 = 0x1000;
const WINDOW: u64 = 0xd000_0000;
const MAC: MacAddr = MacAddr([0x02, 0x6b, 0x69, 0x6c, 0x6e, 0x01]);

fn net(tap: &str, mac: Option<MacAddr>) -> NetConfig {
    let mut n: NetConfig = format!("tap={tap}").parse().unwrap();
    n.mac = mac;
    n
}

fn spec(code: Vec<u8>, console: &Captured, net: NetConfig) -> MachineSpec {
    MachineSpec {
        irqchip: true,
        net: Some(net),
        ..MachineSpec::raw(code, LOAD_ADDR, CpuMode::Long, Box::new(console.clone()))
    }
}

/// 64-bit code that prints the first virtio window's magic ("virt"), its device ID + '0'
/// and the 6 bytes of its config space (the MAC), then halts. Everything is read before
/// anything is printed: printing goes through `al`, the low byte of the window's address.
fn probe_mac() -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    code.extend_from_slice(&[0x48, 0xb8]);
    code.extend_from_slice(&WINDOW.to_le_bytes()); // mov rax, window
    code.extend_from_slice(&[0x8b, 0x18]); // mov ebx, [rax] (MagicValue)
    code.extend_from_slice(&[0x8b, 0x48, 0x08]); // mov ecx, [rax+8] (DeviceID)
    code.extend_from_slice(&[0x8b, 0xb0, 0x00, 0x01, 0x00, 0x00]); // mov esi, [rax+0x100]
    code.extend_from_slice(&[0x8b, 0xb8, 0x04, 0x01, 0x00, 0x00]); // mov edi, [rax+0x104]
    for _ in 0..4 {
        code.extend_from_slice(&[0x88, 0xd8, 0xee, 0xc1, 0xeb, 0x08]); // mov al, bl; out; shr ebx, 8
    }
    code.extend_from_slice(&[0x88, 0xc8, 0x04, b'0', 0xee]); // mov al, cl; add al, '0'; out
    for _ in 0..4 {
        code.extend_from_slice(&[0x89, 0xf0, 0xee, 0xc1, 0xee, 0x08]); // mov eax, esi; out; shr esi, 8
    }
    for _ in 0..2 {
        code.extend_from_slice(&[0x89, 0xf8, 0xee, 0xc1, 0xef, 0x08]); // mov eax, edi; out; shr edi, 8
    }
    code.push(0xf4); // hlt
    code
}

#[test]
fn net_device_answers_on_the_mmio_bus_with_its_mac() {
    in_netns(|| {
        tap::create_persistent("kt0", None).unwrap();
        let console = Captured::default();
        let vmm = Vmm::build(spec(probe_mac(), &console, net("kt0", Some(MAC)))).unwrap();
        assert_eq!(run_until(vmm, &console, 11), GuestExit::Stopped);
        let mut want = b"virt1".to_vec(); // virtio-net is device ID 1
        want.extend_from_slice(&MAC.0);
        assert_eq!(console.bytes(), want);
        // The TAP is free again once the VM is gone; a random MAC is unicast and local.
        let console = Captured::default();
        let vmm = Vmm::build(spec(probe_mac(), &console, net("kt0", None))).unwrap();
        assert_eq!(run_until(vmm, &console, 11), GuestExit::Stopped);
        assert_eq!(console.bytes()[5] & 3, 2, "{:?}", console.bytes());
    });
}

/// Builds a VM that prints one byte and spins (so that it can be paused), with `net`,
/// snapshots it into `dir` and stops it.
fn snapshot_spinning_vm(net: Option<NetConfig>, dir: std::path::PathBuf) {
    let console = Captured::default();
    let code = PRINT_AND_SPIN.to_vec();
    let vmm = Vmm::build(MachineSpec {
        irqchip: true,
        net,
        ..MachineSpec::raw(code, LOAD_ADDR, CpuMode::Long, Box::new(console.clone()))
    })
    .unwrap();
    let (exit, answer) = run_while(vmm, &console, move |vm| {
        snapshot(vm, dir, SnapshotKind::Full)
    });
    assert_eq!(exit, GuestExit::Stopped);
    answer.expect("snapshot");
}

#[test]
fn net_snapshot_keeps_the_device_and_each_restore_needs_its_own_tap() {
    in_netns(|| {
        for name in ["ko", "kc1"] {
            tap::create_persistent(name, None).unwrap();
        }
        let dir = util::scratch("net-snapshot");
        let (snap, plain) = (dir.join("snap"), dir.join("plain"));
        snapshot_spinning_vm(Some(net("ko", Some(MAC))), snap.clone());
        snapshot_spinning_vm(None, plain.clone());
        let state = kiln::snapshot::read_state(&snap).unwrap();
        let saved = state
            .devices
            .net()
            .expect("the snapshot has the network device");
        assert_eq!((saved.mac, saved.tap.as_str()), (MAC, "ko"));

        let restore = |from: &std::path::Path, net: Option<NetConfig>| {
            Vmm::restore(RestoreSpec {
                net,
                ..RestoreSpec::new(from.to_path_buf(), Box::new(Captured::default()))
            })
        };
        let refused = restore(&snap, None).err().expect("restored without a TAP");
        assert!(refused.to_string().contains("its own --net"), "{refused}");
        let missing = restore(&snap, Some(net("kc2", None)))
            .err()
            .expect("no such TAP");
        assert!(missing.to_string().contains("does not exist"), "{missing}");
        let extra = restore(&plain, Some(net("kc1", None)))
            .err()
            .expect("--net for a snapshot without a network device");
        assert!(extra.to_string().contains("no network device"), "{extra}");
        let clone = restore(&snap, Some(net("kc1", None))).unwrap();
        let busy = restore(&snap, Some(net("kc1", None)))
            .err()
            .expect("two clones on one TAP");
        assert!(busy.to_string().contains("attached"), "{busy}");
        drop(clone);
        std::fs::remove_dir_all(dir).unwrap();
    });
}
