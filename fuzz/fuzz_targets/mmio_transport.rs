//! The virtio-mmio transport's register interface, as a guest drives it: up to 256 reads
//! and writes of any size (1, 2, 4 or 8 bytes) at any offset of the 0x200-byte window
//! (registers and config space), in any order and any device state, against a transport
//! around a virtio-blk device over a 64 KiB scratch image and 64 KiB of guest memory. The
//! bus only hands the transport accesses that fit the window; so does this target.
//!
//! Must never panic; the device status never shows a bit the protocol forbids together
//! (DRIVER_OK without FEATURES_OK).

#![no_main]

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::Arbitrary;
use kiln_devices::virtio::block::{Block, RawFile};
use kiln_devices::virtio::{GuestMemory, MmioTransport, MMIO_WINDOW_SIZE};
use kiln_devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

#[derive(Arbitrary, Debug)]
enum Access {
    Read { offset: u16, size: u8 },
    Write { offset: u16, size: u8, value: u64 },
}

/// One scratch image per fuzzing process (the device only reads and writes it), already
/// unlinked so that nothing is left behind when libFuzzer exits: each run opens it anew
/// through /proc/self/fd.
fn image() -> &'static PathBuf {
    static IMAGE: OnceLock<(std::fs::File, PathBuf)> = OnceLock::new();
    &IMAGE
        .get_or_init(|| {
            let path =
                std::env::temp_dir().join(format!("kiln-fuzz-mmio-{}.img", std::process::id()));
            std::fs::write(&path, vec![0u8; 64 * 1024]).expect("writing the scratch image");
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .expect("opening the scratch image");
            std::fs::remove_file(&path).expect("unlinking the scratch image");
            let by_fd = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
            (file, by_fd)
        })
        .1
}

/// The access as the bus would hand it over: (offset, length) inside the window.
fn place(offset: u16, size: u8) -> (u64, usize) {
    let len = [1usize, 2, 4, 8][usize::from(size % 4)];
    let offset = u64::from(offset) % (MMIO_WINDOW_SIZE - len as u64 + 1);
    (offset, len)
}

fuzz_target!(|accesses: Vec<Access>| {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let disk = RawFile::open(image(), false).unwrap();
    let block = Block::new(disk, b"fuzz").unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(mem, Arc::new(Mutex::new(block)), irq).unwrap();
    for access in accesses.iter().take(256) {
        match *access {
            Access::Read { offset, size } => {
                let (offset, len) = place(offset, size);
                let mut buf = [0u8; 8];
                t.read(offset, &mut buf[..len]);
            }
            Access::Write {
                offset,
                size,
                value,
            } => {
                let (offset, len) = place(offset, size);
                t.write(offset, &value.to_le_bytes()[..len]);
            }
        }
        let status = t.device_status();
        assert!(
            status & 0x04 == 0 || status & 0x08 != 0,
            "DRIVER_OK without FEATURES_OK: {status:#x}"
        );
    }
});
