//! QEMU with TCG emulating an AMD CPU with SVM and nested paging: the machine that the
//! nested test bed runs on, and a plain way to boot a guest image without kiln.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

/// The QEMU binary (Debian's `qemu-system-x86`).
pub const QEMU: &str = "qemu-system-x86_64";

/// One QEMU boot of a kernel and initramfs, console on the serial port, ending when the
/// guest resets (`-no-reboot`).
#[derive(Debug, Clone)]
pub struct Qemu {
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
        let mut cmd = Command::new(QEMU);
        cmd.args(["-accel", "tcg", "-cpu", "EPYC,+svm,+npt"])
            .args(["-m", &self.memory_mib.to_string()])
            .args(["-smp", &self.cpus.to_string()])
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
