//! The VM configuration: what `kiln run` is asked to boot, from flags or a TOML file.
//!
//! Validation lives here so that every bad value gets one clear message before any KVM
//! object exists.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Kernel command line used when none is given: console on the first UART, reset through
/// the i8042 (so a reboot ends the VM), reset on panic (kiln tells the two apart from the
/// console), one legacy UART only, no port-0x80 delays (each would be a VM exit).
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1 io_delay=none quiet";

/// Most vCPUs a VM may have (the MP table and the CPUID topology are sized for this).
pub const MAX_VCPUS: u8 = 32;
/// Least guest memory, in MiB: below this not even a tiny kernel fits.
pub const MIN_MEMORY_MIB: u64 = 16;

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SerialOutput {
    /// The kiln process's standard output.
    #[default]
    Stdout,
    /// Discard it.
    Null,
    /// Append to this file.
    #[serde(untagged)]
    File(PathBuf),
}

impl std::str::FromStr for SerialOutput {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdout" | "-" => SerialOutput::Stdout,
            "null" | "none" => SerialOutput::Null,
            path => SerialOutput::File(PathBuf::from(path)),
        })
    }
}

/// Everything needed to build and boot one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest kernel: an uncompressed ELF `vmlinux` or a `bzImage`.
    pub kernel: PathBuf,
    /// Optional initramfs (cpio, possibly compressed).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Number of vCPUs, 1..=32.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Where the serial console goes.
    #[serde(default)]
    pub serial: SerialOutput,
    /// Have KVM log the pages the guest writes, so that snapshots can be diffs. Costs a
    /// write fault per page per snapshot interval; off by default.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Confine kiln's threads with seccomp filters once the VM runs (on by default; turn
    /// off only to debug a filter).
    #[serde(default = "default_seccomp")]
    pub seccomp: bool,
    /// Disks, `/dev/vda` first (`[[disk]]` tables in TOML; `--disk` on the command line).
    #[serde(default, rename = "disk", skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<crate::disk::DiskConfig>,
    /// The network device (`net = "tap=…"` in TOML, the same string as `--net`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<crate::net::NetConfig>,
    /// A virtio-rng device that feeds the guest's entropy pool from the host's (on by
    /// default; `rng = false`, `--no-rng` to leave it out).
    #[serde(default = "default_rng")]
    pub rng: bool,
    /// ACPI tables describing the vCPUs, interrupt controllers and devices, for kernels
    /// without an MP table parser (on by default; `acpi = false`, `--no-acpi` to leave
    /// them out: the MP table and the command line then describe the machine alone).
    #[serde(default = "default_acpi")]
    pub acpi: bool,
    /// The virtio devices are described in the ACPI DSDT instead of on the kernel command
    /// line (`acpi_devices = true`, `--acpi-devices`), for kernels that find virtio-mmio
    /// devices only through ACPI (built without VIRTIO_MMIO_CMDLINE_DEVICES). Never both:
    /// a kernel that reads both would probe each device twice.
    #[serde(default)]
    pub acpi_devices: bool,
}

fn default_acpi() -> bool {
    true
}

fn default_rng() -> bool {
    true
}

fn default_seccomp() -> bool {
    true
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}
fn default_vcpus() -> u8 {
    1
}
fn default_memory() -> u64 {
    128
}

/// A configuration that cannot be booted, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message} (line {line})")]
    Parse {
        path: PathBuf,
        message: String,
        line: usize,
    },
    #[error("--vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u64),
    #[error("--memory must be at least {MIN_MEMORY_MIB} MiB, got {0} MiB")]
    MemoryTooSmall(u64),
    #[error(
        "--memory {asked} MiB is more than this host's {host} MiB of RAM; give the guest less"
    )]
    MemoryTooLarge { asked: u64, host: u64 },
    #[error("kernel command line is {0} bytes; the limit is {max}", max = crate::arch::x86_64::layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("{0} disks: a VM takes at most {max}", max = crate::disk::MAX_DISKS)]
    TooManyDisks(usize),
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: default_cmdline(),
            vcpus: default_vcpus(),
            memory_mib: default_memory(),
            serial: SerialOutput::default(),
            track_dirty_pages: false,
            seccomp: default_seccomp(),
            disks: Vec::new(),
            net: None,
            rng: default_rng(),
            acpi: default_acpi(),
            acpi_devices: false,
        }
    }

    /// Reads a TOML config file. Relative paths in it are taken relative to the file.
    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        let mut config: VmConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().trim().to_string(),
            line: e
                .span()
                .map_or(0, |s| text[..s.start].lines().count().max(1)),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.kernel = base.join(&config.kernel);
        config.initrd = config.initrd.map(|p| base.join(p));
        if let SerialOutput::File(p) = &config.serial {
            config.serial = SerialOutput::File(base.join(p));
        }
        for d in &mut config.disks {
            d.path = base.join(&d.path);
            d.overlay = d.overlay.as_ref().map(|p| base.join(p));
        }
        Ok(config)
    }

    /// Checks the numbers. Files are checked when they are opened, where the error can say
    /// exactly what is wrong with them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus.into()));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib));
        }
        let host = host_memory_mib();
        if self.memory_mib > host {
            return Err(ConfigError::MemoryTooLarge {
                asked: self.memory_mib,
                host,
            });
        }
        if self.disks.len() > crate::disk::MAX_DISKS {
            return Err(ConfigError::TooManyDisks(self.disks.len()));
        }
        if self.cmdline.len() >= crate::arch::x86_64::layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        Ok(())
    }

    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

/// The host's physical RAM in MiB (the ceiling for a guest's memory).
fn host_memory_mib() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    match (u64::try_from(pages), u64::try_from(page_size)) {
        (Ok(p), Ok(s)) if p > 0 && s > 0 => (p * s) >> 20,
        _ => u64::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_vcpus_and_too_many_are_refused() {
        let mut c = VmConfig::new("k");
        c.vcpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Vcpus(0))));
        c.vcpus = 33;
        assert!(matches!(c.validate(), Err(ConfigError::Vcpus(33))));
        c.vcpus = 32;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn memory_bounds() {
        let mut c = VmConfig::new("k");
        c.memory_mib = 0;
        assert!(matches!(c.validate(), Err(ConfigError::MemoryTooSmall(0))));
        c.memory_mib = 1 << 40;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
    }

    #[test]
    fn toml_paths_are_relative_to_the_file() {
        let dir = crate::test_util::scratch("config");
        let file = dir.join("vm.toml");
        std::fs::write(
            &file,
            "kernel = \"vmlinux\"\ninitrd = \"/abs/initrd\"\nvcpus = 2\nmemory_mib = 256\nserial = \"out.log\"\n",
        )
        .unwrap();
        let c = VmConfig::from_toml_file(&file).unwrap();
        assert_eq!(c.kernel, dir.join("vmlinux"));
        assert_eq!(c.initrd, Some(PathBuf::from("/abs/initrd")));
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.serial, SerialOutput::File(dir.join("out.log")));
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        std::fs::write(
            &file,
            "kernel = \"k\"\n[[disk]]\npath = \"base.img\"\noverlay = \"/o/v\"\n[[disk]]\npath = \"d.img\"\nread_only = true\n",
        )
        .unwrap();
        let c = VmConfig::from_toml_file(&file).unwrap();
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[0].path, dir.join("base.img"));
        assert_eq!(c.disks[0].overlay, Some(PathBuf::from("/o/v")));
        assert!(c.disks[1].read_only);
        std::fs::write(&file, "kernel = \"k\"\nmemroy_mib = 5\n").unwrap();
        let err = VmConfig::from_toml_file(&file).unwrap_err().to_string();
        assert!(err.contains("memroy_mib"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
