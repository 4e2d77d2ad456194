//! Disks on the direct path: a hand-made guest cannot drive virtio-blk, so these tests
//! check what the VMM does around it — the devices on the MMIO bus where the command line
//! says they are, snapshots that copy the overlay and clones that each get their own copy,
//! and `kiln run --disk` refusing bad images with one clear line.

use std::path::{Path, PathBuf};

use kiln::arch::x86_64::regs::CpuMode;
use kiln::disk::DiskConfig;
use kiln::snapshot::restore::RestoreSpec;
use kiln::snapshot::validate::PathRules;
use kiln::snapshot::SnapshotKind;
use kiln::vmm::{GuestExit, MachineSpec, Vmm};

mod util;
use util::console::{run_until, run_while, snapshot, Captured, PRINT_AND_SPIN};
use util::{fails, kiln, run_ok, scratch, tiny_kernel};

const LOAD_ADDR: u64 = 0x1000;
const HLT: u8 = 0xf4;
const WINDOW: u64 = 0xd000_0000;

fn image(path: &Path, len: usize, fill: u8) {
    std::fs::write(path, vec![fill; len]).unwrap();
}

fn spec(code: Vec<u8>, console: &Captured, disks: Vec<DiskConfig>) -> MachineSpec {
    MachineSpec {
        irqchip: true,
        disks,
        ..MachineSpec::raw(code, LOAD_ADDR, CpuMode::Long, Box::new(console.clone()))
    }
}

/// 64-bit code that, for each of `windows` virtio-mmio windows, prints the magic ("virt"),
/// the device ID + '0' and the config space's capacity (sectors) >> 8 + '0', then halts.
fn probe_windows(windows: u64) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for w in 0..windows {
        code.extend_from_slice(&[0x48, 0xb8]);
        code.extend_from_slice(&(WINDOW + w * 0x1000).to_le_bytes()); // mov rax, window
        code.extend_from_slice(&[0x8b, 0x18]); // mov ebx, [rax]  (MagicValue)
        code.extend_from_slice(&[0x8b, 0x48, 0x08]); // mov ecx, [rax+8] (DeviceID)
        code.extend_from_slice(&[0x8b, 0xb0, 0x00, 0x01, 0x00, 0x00]); // mov esi, [rax+0x100]
        for _ in 0..4 {
            code.extend_from_slice(&[0x88, 0xd8, 0xee]); // mov al, bl; out dx, al
            code.extend_from_slice(&[0xc1, 0xeb, 0x08]); // shr ebx, 8
        }
        code.extend_from_slice(&[0x88, 0xc8, 0x04, b'0', 0xee]); // mov al, cl; add al, '0'; out
        code.extend_from_slice(&[0xc1, 0xee, 0x08]); // shr esi, 8
        code.extend_from_slice(&[0x89, 0xf0, 0x04, b'0', 0xee]); // mov eax, esi; add al, '0'; out
    }
    code.push(HLT);
    code
}

#[test]
fn disks_answer_on_the_mmio_bus_in_order() {
    let dir = scratch("bus");
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    image(&a, 1 << 20, 0); // 2048 sectors: 0x800 >> 8 = 8
    image(&b, 3 << 20, 0); // 6144 sectors: 0x1800 >> 8 = 24 ('0' + 24 = 'H')
    let mut ro = DiskConfig::new(&a);
    ro.read_only = true;
    let mut cow = DiskConfig::new(&b);
    cow.overlay = Some(dir.join("b.overlay"));
    let console = Captured::default();
    let vmm = Vmm::build(spec(probe_windows(2), &console, vec![ro, cow])).unwrap();
    assert!(
        dir.join("b.overlay").exists(),
        "the overlay is created at build"
    );
    let exit = run_until(vmm, &console, 12);
    assert_eq!(exit, GuestExit::Stopped, "{:?}", console.text());
    // virtio-blk is device ID 2: '0' + 2 = '2'.
    assert_eq!(console.text(), "virt28virt2H");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A snapshot of a VM with an overlay disk copies the overlay into the snapshot; each
/// restore gets its own copy (at --disk-overlay's path or in its scratch directory) and
/// the snapshot's copy and the original's overlay are left alone. A writable raw disk is
/// refused, saying why.
#[test]
fn snapshot_copies_the_overlay_and_each_clone_gets_its_own() {
    let dir = scratch("snap");
    let base = dir.join("base.img");
    image(&base, 1 << 20, 0xab);
    let overlay = dir.join("vm.overlay");
    let mut disk = DiskConfig::new(&base);
    disk.overlay = Some(overlay.clone());
    let console = Captured::default();
    let vmm = Vmm::build(spec(PRINT_AND_SPIN.to_vec(), &console, vec![disk])).unwrap();
    // What the VM wrote to its overlay so far (as a guest write through the device would).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&overlay)
        .map(|f| std::os::unix::fs::FileExt::write_all_at(&f, b"written-before", 8192))
        .unwrap()
        .unwrap();
    let snap = dir.join("snap");
    let snap_dir = snap.clone();
    let (exit, answer) = run_while(vmm, &console, move |vm| {
        snapshot(vm, snap_dir, SnapshotKind::Full)
    });
    assert_eq!(exit, GuestExit::Stopped);
    answer.expect("snapshot");
    let copy = snap.join("disk-0.overlay");
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&overlay).unwrap()
    );

    // The base is outside the snapshot directory and any image store: a restore takes it
    // only when it is given again.
    let outside = Vmm::restore(RestoreSpec {
        disk_overlays: vec![(0, dir.join("unused.overlay"))],
        ..RestoreSpec::new(snap.clone(), Box::new(Captured::default()))
    })
    .err()
    .expect("an image outside the snapshot directory was taken")
    .to_string();
    assert!(
        outside.contains("outside the snapshot directory") && outside.contains("--disk-image 0="),
        "{outside}"
    );
    assert!(!dir.join("unused.overlay").exists());
    let given_base = PathRules {
        disk_images: vec![(0, base.clone())],
        ..PathRules::default()
    };
    let restore = |overlays: Vec<(usize, PathBuf)>, scratch: Option<PathBuf>| {
        let console = Captured::default();
        Vmm::restore(RestoreSpec {
            disk_overlays: overlays,
            disk_scratch: scratch,
            paths: given_base.clone(),
            ..RestoreSpec::new(snap.clone(), Box::new(console))
        })
    };
    let refused = restore(Vec::new(), None)
        .err()
        .expect("restored without an overlay");
    assert!(
        refused.to_string().contains("--disk-overlay 0=PATH"),
        "{refused}"
    );
    let mine = dir.join("clone0.overlay");
    let clone = restore(vec![(0, mine.clone())], None).unwrap();
    assert_eq!(std::fs::read(&mine).unwrap(), std::fs::read(&copy).unwrap());
    drop(clone);
    let again = restore(vec![(0, mine.clone())], None)
        .err()
        .expect("two clones shared an overlay");
    assert!(again.to_string().contains("already exists"), "{again}");
    let scratch_dir = scratch("snap-scratch");
    let clone = restore(Vec::new(), Some(scratch_dir.clone())).unwrap();
    assert!(scratch_dir.join("disk-0.overlay").exists());
    drop(clone);
    // A base that changed after the snapshot is refused.
    let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"changed", 0).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    drop(f);
    let changed = restore(vec![(0, dir.join("changed.overlay"))], None)
        .err()
        .expect("a changed base was restored over");
    assert!(
        changed
            .to_string()
            .contains("was modified after the snapshot"),
        "{changed}"
    );
    let wrong = restore(vec![(3, dir.join("x"))], Some(scratch_dir.join("sub")))
        .err()
        .expect("an overlay for a disk that is not there");
    assert!(wrong.to_string().contains("no overlay disk 3"), "{wrong}");

    // A writable raw disk: no snapshot.
    let raw = dir.join("raw.img");
    image(&raw, 1 << 20, 0);
    let console = Captured::default();
    let machine = spec(
        PRINT_AND_SPIN.to_vec(),
        &console,
        vec![DiskConfig::new(&raw)],
    );
    let snap2 = dir.join("snap2");
    let (_, answer) = run_while(Vmm::build(machine).unwrap(), &console, move |vm| {
        snapshot(vm, snap2, SnapshotKind::Full)
    });
    let refused = answer.expect_err("a writable raw disk was snapshotted");
    assert!(
        refused.to_string().contains("writable raw image"),
        "{refused}"
    );
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(scratch_dir).unwrap();
}

/// Runs `kiln run --kernel TINY ARGS`, asserts failure without a panic, returns the one
/// error line.
fn run_fails(dir: &Path, args: &[&str]) -> String {
    let kernel = dir.join("tiny.elf");
    if !kernel.exists() {
        tiny_kernel(dir, "hi\n");
    }
    fails(kiln().arg("run").arg("--kernel").arg(&kernel).args(args))
}

#[test]
fn bad_disks_get_one_clear_error() {
    let dir = scratch("cli");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let missing = dir.join("missing.img");
    let line = run_fails(&dir, &["--disk", &s(&missing)]);
    assert!(
        line.contains(&s(&missing)) && line.contains("No such file"),
        "{line}"
    );
    let line = run_fails(&dir, &["--disk", &s(&dir)]);
    assert!(line.contains("is a directory"), "{line}");
    let odd = dir.join("odd.img");
    image(&odd, 1000, 0);
    let line = run_fails(&dir, &["--disk", &s(&odd)]);
    assert!(line.contains("not a multiple of 512"), "{line}");
    let raw = dir.join("raw.img");
    image(&raw, 1 << 20, 0);
    let line = run_fails(&dir, &["--root-disk", &s(&raw)]);
    assert!(line.contains("not an ext4"), "{line}");
    let line = run_fails(&dir, &["--disk", &format!("{},root", s(&raw))]);
    assert!(line.contains("not an ext4"), "{line}");
    let line = run_fails(
        &dir,
        &[
            "--disk",
            &format!("{},overlay=/nonexistent/dir/ov", s(&raw)),
        ],
    );
    assert!(
        line.contains("cannot create overlay /nonexistent/dir/ov"),
        "{line}"
    );
    let line = run_fails(
        &dir,
        &["--disk", &format!("{},overlay=/proc/kiln-ov", s(&raw))],
    );
    assert!(line.contains("/proc/kiln-ov"), "{line}");
    let line = run_fails(
        &dir,
        &["--disk", &format!("{},overlay={}", s(&raw), s(&odd))],
    );
    assert!(line.contains("already exists"), "{line}");
    let line = run_fails(
        &dir,
        &[
            "--disk",
            &format!("{},ro,overlay={}", s(&raw), s(&dir.join("o"))),
        ],
    );
    assert!(line.contains("contradict"), "{line}");
    let line = run_fails(&dir, &["--disk", &format!("{},fast", s(&raw))]);
    assert!(line.contains("unknown option \"fast\""), "{line}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `kiln run --disk base,overlay=O` with the tiny kernel: the VM runs, O is created with
/// the base's size and the base is not touched.
#[test]
fn run_with_an_overlay_disk_leaves_the_base_alone() {
    let dir = scratch("run");
    let kernel = tiny_kernel(&dir, "hi\n");
    let base = dir.join("base.img");
    image(&base, 1 << 20, 7);
    let overlay = dir.join("o.overlay");
    run_ok(
        kiln()
            .arg("run")
            .arg("--kernel")
            .arg(&kernel)
            .arg("--disk")
            .arg(format!(
                "{},overlay={},serial=disk0",
                base.display(),
                overlay.display()
            )),
    );
    assert_eq!(std::fs::metadata(&overlay).unwrap().len(), 1 << 20);
    assert_eq!(std::fs::read(&base).unwrap(), vec![7u8; 1 << 20]);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A diff snapshot carries the disks as a full one does (the memory part is what differs):
/// its own copy of the overlay as it is at the diff, and a restore of the diff gives the
/// clone a copy of that.
#[test]
fn diff_snapshots_carry_disks_too() {
    let dir = scratch("diff");
    let base = dir.join("base.img");
    image(&base, 1 << 20, 0);
    let overlay = dir.join("vm.overlay");
    let mut disk = DiskConfig::new(&base);
    disk.overlay = Some(overlay.clone());
    let console = Captured::default();
    let mut machine = spec(PRINT_AND_SPIN.to_vec(), &console, vec![disk]);
    machine.track_dirty_pages = true;
    let vmm = match Vmm::build(machine) {
        Ok(vmm) => vmm,
        Err(e) => {
            eprintln!("this /dev/kvm has no dirty page log ({e}); nothing to check");
            return;
        }
    };
    let written = overlay.clone();
    let write = move |at: u64, what: &[u8]| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&written)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, what, at).unwrap();
    };
    write(0, b"first");
    let (full, diff) = (dir.join("full"), dir.join("diff"));
    let (full_dir, diff_dir) = (full.clone(), diff.clone());
    let (exit, (first, second)) = run_while(vmm, &console, move |vm| {
        let first = snapshot(vm, full_dir, SnapshotKind::Full);
        write(8192, b"second");
        (first, snapshot(vm, diff_dir, SnapshotKind::Diff))
    });
    assert_eq!(exit, GuestExit::Stopped);
    first.expect("full snapshot");
    second.expect("diff snapshot");
    let at_diff = std::fs::read(diff.join("disk-0.overlay")).unwrap();
    assert_eq!(&at_diff[8192..8198], b"second");
    let at_full = std::fs::read(full.join("disk-0.overlay")).unwrap();
    assert_eq!(&at_full[..5], b"first");
    assert_eq!(&at_full[8192..8198], &[0u8; 6]);
    let mine = dir.join("clone.overlay");
    let clone = Vmm::restore(RestoreSpec {
        disk_overlays: vec![(0, mine.clone())],
        paths: PathRules {
            disk_images: vec![(0, dir.join("base.img"))],
            ..PathRules::default()
        },
        ..RestoreSpec::new(diff.clone(), Box::new(Captured::default()))
    })
    .unwrap();
    drop(clone);
    assert_eq!(std::fs::read(&mine).unwrap(), at_diff);
    std::fs::remove_dir_all(dir).unwrap();
}
