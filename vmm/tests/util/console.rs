//! A guest console sink for direct tests: it keeps what the guest wrote and lets the test
//! wait until enough has arrived, or run a VM until it has, or snapshot it while it runs.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kiln::snapshot::SnapshotKind;
use kiln::vmm::{ControlError, Controller, GuestExit, Reply, Request, SnapshotTaken, Vmm};

/// 64-bit code that prints 'R' and spins: a guest that runs until it is stopped, and whose
/// vCPU can be paused for a snapshot (the byte says it runs).
pub const PRINT_AND_SPIN: [u8; 9] = [0x66, 0xba, 0xf8, 0x03, 0xb0, b'R', 0xee, 0xeb, 0xfe];

#[derive(Clone, Default)]
pub struct Captured(Arc<(Mutex<Vec<u8>>, Condvar)>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 .0.lock().unwrap().extend_from_slice(buf);
        self.0 .1.notify_all();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    pub fn bytes(&self) -> Vec<u8> {
        self.0 .0.lock().unwrap().clone()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// Blocks until the guest has written at least `len` bytes (or 20 s have passed).
    pub fn wait_for(&self, len: usize) {
        let (lock, cond) = &*self.0;
        let guard = lock.lock().unwrap();
        let _ = cond
            .wait_timeout_while(guard, Duration::from_secs(20), |b| b.len() < len)
            .unwrap();
    }
}

/// Runs `vmm` until its console has `bytes` bytes (or 20 s have passed), then stops it:
/// with an irqchip a guest's HLT waits for an interrupt instead of ending the VM.
pub fn run_until(vmm: Vmm, console: &Captured, bytes: usize) -> GuestExit {
    let stop = vmm.stop_handle().unwrap();
    let watcher = console.clone();
    let waiter = std::thread::spawn(move || {
        watcher.wait_for(bytes);
        stop.stop();
    });
    let report = vmm.run().unwrap();
    waiter.join().unwrap();
    report.exit
}

/// Asks the VM behind `controller` for a snapshot of `kind` into `dir`, resuming it after.
pub fn snapshot(
    controller: &Controller,
    dir: PathBuf,
    kind: SnapshotKind,
) -> Result<SnapshotTaken, ControlError> {
    let request = Request::Snapshot {
        dir,
        resume: true,
        kind,
    };
    match controller.call(request)? {
        Reply::Snapshot(taken) => Ok(taken),
        other => panic!("a snapshot request was answered with {other:?}"),
    }
}

/// Runs `vmm`; once the guest has printed a byte, `script` runs on another thread with the
/// VM's controller, and then the VM is stopped. Returns how the VM ended and what `script`
/// returned.
pub fn run_while<T: Send + 'static>(
    vmm: Vmm,
    console: &Captured,
    script: impl FnOnce(&Controller) -> T + Send + 'static,
) -> (GuestExit, T) {
    let (controller, stop) = (vmm.controller(), vmm.stop_handle().unwrap());
    let watch = console.clone();
    let scripted = std::thread::spawn(move || {
        watch.wait_for(1);
        let said = script(&controller);
        stop.stop();
        said
    });
    let report = vmm.run().unwrap();
    (report.exit, scripted.join().unwrap())
}
