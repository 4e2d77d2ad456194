//! A guest console sink for direct tests: it keeps what the guest wrote and lets the test
//! wait until enough has arrived, or run a VM until it has.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kiln::vmm::{GuestExit, Vmm};

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

#[allow(dead_code)] // each test file uses some of these
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
#[allow(dead_code)] // not every test file runs VMs this way
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
