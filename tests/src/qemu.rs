//! QEMU with TCG emulating an AMD CPU with SVM and nested paging: the machine that the
//! nested test bed runs on, and a plain way to boot a guest image without kiln.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The QEMU binary (Debian's `qemu-system-x86`) unless `$KILN_QEMU` names another.
pub const QEMU: &str = "qemu-system-x86_64";

/// `$KILN_QEMU` if set (another build of QEMU, to compare), else [`QEMU`].
pub fn binary() -> OsString {
    std::env::var_os("KILN_QEMU")
        .filter(|q| !q.is_empty())
        .unwrap_or_else(|| QEMU.into())
}

/// One QEMU boot of a kernel and initramfs, console on the serial port, ending when the
/// guest resets (`-no-reboot`).
#[derive(Debug, Clone)]
pub struct Qemu {
    /// The QEMU to run: [`binary`] unless set otherwise.
    pub binary: OsString,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Extra arguments, appended as given.
    pub extra: Vec<OsString>,
}

impl Qemu {
    pub fn new(kernel: impl Into<PathBuf>, initrd: impl Into<PathBuf>, cmdline: &str) -> Self {
        Qemu {
            binary: binary(),
            kernel: kernel.into(),
            initrd: initrd.into(),
            cmdline: cmdline.to_string(),
            memory_mib: 2048,
            cpus: 2,
            extra: Vec::new(),
        }
    }

    /// Records every byte the guest writes to I/O port `port` into `file`
    /// (QEMU's `isa-debugcon`).
    pub fn port_log(mut self, port: u16, file: impl Into<PathBuf>) -> Self {
        let mut chardev = OsString::from("file,id=portlog,path=");
        chardev.push(file.into());
        self.extra.extend([
            "-chardev".into(),
            chardev,
            "-device".into(),
            format!("isa-debugcon,iobase={port:#x},chardev=portlog").into(),
        ]);
        self
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(["-accel", "tcg", "-cpu", "EPYC,+svm,+npt"])
            .args(["-m", &self.memory_mib.to_string()])
            // One socket per CPU: without ACPI the kernel finds CPUs through the MP table,
            // which lists only one core of a multi-core socket.
            .args([
                "-smp",
                &format!("{0},sockets={0},cores=1,threads=1", self.cpus),
            ])
            .args([
                "-nographic",
                "-nodefaults",
                "-serial",
                "stdio",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", &self.cmdline])
            .args(&self.extra);
        cmd
    }
}

/// Kernel parameters that give a Linux booted under TCG a working TSC clocksource.
///
/// Under TCG the guest's TSC is the host's, ticking at the host's rate; but the kernel's
/// calibration against the emulated PIT fails ("Marking TSC unstable"), leaving jiffies as
/// the clock. In the test bed, KVM then runs its guests with no TSC frequency, and they
/// intermittently hang early in boot, more often when the host is busy. Telling the kernel
/// the frequency (measured here) avoids the calibration. Empty if it cannot be measured.
pub fn tcg_tsc_params() -> String {
    static PARAMS: OnceLock<String> = OnceLock::new();
    PARAMS
        .get_or_init(|| match host_tsc_khz() {
            Some(khz) => format!("tsc_early_khz={khz} tsc=reliable"),
            None => String::new(),
        })
        .clone()
}

/// The host TSC's frequency in kHz: the median of a few 20 ms samples against the
/// monotonic clock. `None` without an invariant TSC.
#[cfg(target_arch = "x86_64")]
fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    if !cpuinfo.contains("constant_tsc") || !cpuinfo.contains("nonstop_tsc") {
        return None;
    }
    let mut samples: Vec<u64> = (0..5)
        .filter_map(|_| {
            let (t0, c0) = (Instant::now(), rdtsc());
            // A measuring interval, not a wait for anything.
            std::thread::sleep(Duration::from_millis(20));
            let (c1, t1) = (rdtsc(), Instant::now());
            let micros = u64::try_from(t1.duration_since(t0).as_micros()).ok()?;
            (c1.checked_sub(c0)? * 1000).checked_div(micros)
        })
        .collect();
    samples.sort_unstable();
    // Round to 1 MHz: the kernel's own calibration is no more exact than that.
    samples
        .get(samples.len() / 2)
        .map(|khz| (khz + 500) / 1000 * 1000)
}

#[cfg(not(target_arch = "x86_64"))]
fn host_tsc_khz() -> Option<u64> {
    None
}

#[cfg(target_arch = "x86_64")]
fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter; it has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_tsc_frequency_is_plausible() {
        let params = tcg_tsc_params();
        if let Some(khz) = params
            .split_whitespace()
            .find_map(|p| p.strip_prefix("tsc_early_khz="))
        {
            let khz: u64 = khz.parse().unwrap();
            assert!((500_000..10_000_000).contains(&khz), "{khz} kHz");
            assert!(params.contains("tsc=reliable"));
        }
    }
}
