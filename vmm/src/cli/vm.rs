//! The VM a `kiln run` or `kiln job` boots: its flags ([`VmArgs`], merged over a
//! `--config` file into a [`VmConfig`]), the cgroup slot it runs in, and what each of the
//! two commands adds.

use std::path::PathBuf;

use clap::Args;

use crate::config::{SerialOutput, VmConfig};

/// What VM to boot: shared by `kiln run` and `kiln job`.
#[derive(Args, Debug)]
pub struct VmArgs {
    /// Guest kernel: an uncompressed ELF vmlinux or a bzImage. Default: `vmlinux` in
    /// $KILN_HOME, /usr/lib/kiln or the kernel build cache (`kiln doctor` says which).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs to hand the kernel: a cpio archive, uncompressed or compressed in a
    /// format the kernel unpacks (gzip, zstd, xz…), or several concatenated (an
    /// uncompressed microcode cpio, then the main one). Loaded as it is, as high in low
    /// memory as the kernel's initrd_addr_max and --memory allow.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line. Default: "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1
    /// io_delay=none quiet" (reboot=k and panic=-1 let kiln see the guest end).
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,
    /// Number of vCPUs (1 to 32). Default 1.
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u64>,
    /// Guest memory in MiB (at least 16, at most the host's RAM). Default 128.
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u64>,
    /// Where the serial console goes: `stdout`, `null` or a file path (appended).
    /// Default: stdout for `kiln run`, null for `kiln job`.
    #[arg(long, value_name = "stdout|null|PATH")]
    pub serial: Option<SerialOutput>,
    /// Read the VM configuration from a TOML file (keys: kernel, initrd, cmdline, vcpus,
    /// memory_mib, serial, track_dirty_pages, seccomp, rng, acpi, net = "tap=…" as for --net, and
    /// `[[disk]]` tables with path, read_only, overlay, rw, root, serial); flags given as
    /// well override it.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Have KVM log the pages the guest writes, so that `kiln ctl snapshot --diff` can
    /// write only those. Needs a /dev/kvm with dirty page logging.
    #[arg(long)]
    pub track_dirty_pages: bool,
    /// Do not confine kiln's threads with seccomp filters (for debugging a filter only:
    /// the VMM then runs with every syscall open to it).
    #[arg(long)]
    pub no_seccomp: bool,
    /// Leave out the virtio-rng device that otherwise feeds the guest's entropy pool from
    /// the host's getrandom(2).
    #[arg(long)]
    pub no_rng: bool,
    /// Leave out the ACPI tables: the guest learns its CPUs and interrupt routing from the
    /// MP table alone (kernels built without X86_MPPARSE then see one CPU) and its virtio
    /// devices from the command line alone.
    #[arg(long)]
    pub no_acpi: bool,
    /// Describe the virtio devices in the ACPI tables (DSDT) instead of on the kernel
    /// command line: for kernels that find virtio-mmio devices only through ACPI, built
    /// without VIRTIO_MMIO_CMDLINE_DEVICES (Debian's, for one).
    #[arg(long, conflicts_with = "no_acpi")]
    pub acpi_devices: bool,
    /// Attach a disk image as a virtio-blk device (repeatable; /dev/vda, /dev/vdb, … in
    /// order): `PATH[,ro][,rw][,root][,overlay=OVERLAY][,serial=ID]`. `ro`: the guest cannot
    /// write. `overlay=OVERLAY`: the image is a read-only base and this VM's writes go to
    /// the new file OVERLAY (copy-on-write; many VMs can share one base). `root`: boot from
    /// it (ext4; adds `root=/dev/vdX rw init=/sbin/kiln-agent` to the command line unless
    /// it names an init). `kiln job` gives a disk without `ro`/`overlay=` a temporary
    /// overlay, so a job never writes the image; `rw` opts out. Replaces the config's disks.
    #[arg(long, value_name = "PATH[,OPTS]")]
    pub disk: Vec<crate::disk::DiskConfig>,
    /// Boot from this ext4 image: `--disk PATH,root` placed first (/dev/vda). Takes the
    /// same options as --disk.
    #[arg(long, value_name = "PATH[,OPTS]")]
    pub root_disk: Option<crate::disk::DiskConfig>,
    /// Boot from image NAME of the image store (see `kiln image`): its ext4 file as the
    /// root disk, never written: the VM's writes go to a temporary copy-on-write overlay.
    #[arg(long, value_name = "NAME", conflicts_with = "root_disk")]
    pub image: Option<String>,
    /// The image store for --image. Default: $KILN_IMAGE_STORE, else /var/lib/kiln/images.
    #[arg(long, value_name = "DIR", requires = "image")]
    pub store: Option<PathBuf>,
    /// Give the VM a virtio-net device (eth0) on the existing host TAP NAME (see `kiln net
    /// setup`): `tap=NAME[,mac=MAC][,ip=A.B.C.D/N][,gw=A.B.C.D][,dns=A.B.C.D]`. Default MAC: a
    /// random locally administered one. With ip=, the guest agent configures eth0 (and the
    /// default route via gw=, /etc/resolv.conf with dns=). Replaces the config's `net`.
    #[arg(long, value_name = "tap=NAME[,OPTS]")]
    pub net: Option<crate::net::NetConfig>,
    #[command(flatten)]
    pub slot: SlotArgs,
}

/// `--slot`: run in a cgroup v2 slot (see `kiln::slot`).
#[derive(Args, Debug, Clone, Default)]
pub struct SlotArgs {
    /// Run the VM in the cgroup `kiln/slot-N` (cgroup v2), limited to the guest's memory
    /// plus the VMM's overhead, its vCPUs' worth of CPU and a number of processes; a VM
    /// already in that slot is stopped first.
    #[arg(long, value_name = "N")]
    pub slot: Option<u32>,
    /// The slot's memory limit in MiB (default: guest memory + 64).
    #[arg(long, value_name = "MIB", requires = "slot")]
    pub slot_memory: Option<u64>,
}

impl SlotArgs {
    /// Enters the slot, if one was asked for, for a guest of `memory_mib` and `vcpus`.
    pub fn enter(
        &self,
        memory_mib: u64,
        vcpus: u8,
    ) -> Result<Option<crate::slot::Slot>, crate::slot::SlotError> {
        let Some(n) = self.slot else { return Ok(None) };
        let mut limits = crate::slot::SlotLimits::for_guest(memory_mib, vcpus);
        if let Some(m) = self.slot_memory {
            limits.memory_mib = m;
        }
        crate::slot::Slot::enter(n, limits).map(Some)
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Give the VM a virtio-vsock device whose host side is this Unix socket (the
    /// Firecracker/Cloud Hypervisor "hybrid vsock" convention: connect, write
    /// `CONNECT <port>\n`, read `OK <n>\n`). `kiln exec` and `kiln cp` use it.
    #[arg(long, value_name = "PATH")]
    pub vsock: Option<PathBuf>,
    /// The guest's vsock context ID.
    #[arg(long, value_name = "CID", default_value_t = 3)]
    pub cid: u64,
    /// Serve the control API on this Unix socket (must not exist yet): pause, resume,
    /// snapshot, status, shutdown. See the protocol above; `kiln ctl` is its client.
    #[arg(long, value_name = "PATH")]
    pub api: Option<PathBuf>,
    /// Open the API and vsock sockets to this group (name or number): mode 0660 with that
    /// group, instead of 0600 (this user and root only). Default: $KILN_SOCKET_GROUP.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Print a one-line JSON report on stdout when the VM ends: result, boot_ms, exit code.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct JobArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// The job: a shell script run with /bin/sh in the guest.
    #[arg(long, value_name = "PATH", required_unless_present = "command")]
    pub script: Option<PathBuf>,
    /// The job as one command and its arguments, after `--` (`kiln job -- make -j4`),
    /// instead of --script: run as is, without a shell reading it.
    #[arg(last = true, value_name = "CMD", conflicts_with = "script")]
    pub command: Vec<String>,
    /// Set an environment variable for the script (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the guest (default /).
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Start the job in a VM restored from this snapshot (taken with `kiln ctl snapshot` of
    /// a VM with a vsock device) instead of booting one: no --kernel/--initrd then. The
    /// restored guest gets the current time and fresh entropy before the script runs.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "memory", "config", "disk", "root_disk", "image", "no_acpi", "acpi_devices"])]
    pub from_snapshot: Option<PathBuf>,
    /// Let the job snapshot its VM at a point it chooses: when the script runs
    /// `kiln-snapshot` (in the guest), the VM is paused, snapshotted into DIR and resumed,
    /// and `kiln-snapshot` returns 0 (1 if the snapshot failed). Later jobs start from it
    /// with --from-snapshot DIR. A job started --from-snapshot can take the next one (e.g.
    /// sources fetched, then dependencies installed); DIR must not hold a snapshot already.
    #[arg(long, value_name = "DIR")]
    pub snapshot_at: Option<PathBuf>,
    /// Give up if the guest agent is not ready this many seconds after start.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub boot_timeout: u64,
    /// Have the guest agent start dockerd before the script and wait until Docker's socket
    /// answers, so the script can use `docker` from its first line. The image must have
    /// Docker (`kiln image build --packages docker.io,…`); a guest without dockerd, or a
    /// dockerd that does not come up, fails the job with one error line before the script
    /// runs. dockerd logs to /var/log/kiln-dockerd.log in the guest.
    #[arg(long)]
    pub docker: bool,
    /// How long --docker waits for dockerd to answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub docker_timeout: u64,
    /// After the job, print a one-line JSON report on stderr: exit code, boot_ms, job_ms
    /// (and docker_ms, dockerd's start-to-ready time, with --docker).
    #[arg(long)]
    pub json: bool,
}

impl VmArgs {
    pub fn to_config(&self) -> anyhow::Result<VmConfig> {
        let mut config = match &self.config {
            Some(path) => VmConfig::from_toml_file(path)?,
            None => VmConfig::new(match &self.kernel {
                Some(kernel) => kernel.clone(),
                None => crate::defaults::guest_kernel()?,
            }),
        };
        if let Some(k) = &self.kernel {
            config.kernel = k.clone();
        }
        if let Some(i) = &self.initrd {
            config.initrd = Some(i.clone());
        }
        if let Some(c) = &self.cmdline {
            config.cmdline = c.clone();
        }
        if let Some(v) = self.vcpus {
            config.vcpus = u8::try_from(v).map_err(|_| crate::config::ConfigError::Vcpus(v))?;
        }
        if let Some(m) = self.memory {
            config.memory_mib = m;
        }
        if let Some(s) = &self.serial {
            config.serial = s.clone();
        }
        config.track_dirty_pages |= self.track_dirty_pages;
        if self.no_seccomp {
            config.seccomp = false;
        }
        if self.no_rng {
            config.rng = false;
        }
        if self.no_acpi {
            config.acpi = false;
        }
        if self.acpi_devices {
            config.acpi_devices = true;
        }
        let image_root = match &self.image {
            Some(name) => {
                let store = crate::image::Store::locate(self.store.as_deref());
                Some(crate::disk::DiskConfig::new(store.rootfs(name)?))
            }
            None => self.root_disk.clone(),
        };
        if !self.disk.is_empty() || image_root.is_some() {
            config.disks = self.disk.clone();
            if let Some(mut root) = image_root {
                root.root = true;
                config.disks.insert(0, root);
            }
        }
        if let Some(net) = &self.net {
            config.net = Some(net.clone());
        }
        config.validate()?;
        Ok(config)
    }
}
