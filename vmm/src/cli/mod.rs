//! `kiln`'s command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

mod image;
mod net;
mod snapshot;
mod vm;

pub use image::{
    BuildArgs, ImageArgs, ImageCommand, ImportArgs, LsArgs, MakeArgs, PullArgs, RmArgs, StoreArg,
    VerifyArgs,
};
pub use net::{NetCommand, NetSetupArgs};
pub use snapshot::{CtlArgs, CtlRequest, ForkArgs, RestoreArgs, SnapshotImages};
pub use vm::{JobArgs, RunArgs, SlotArgs, VmArgs};

#[derive(Args, Debug)]
pub struct PsArgs {
    /// Print one JSON array of the VMs instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// kiln: a microVM monitor for CI jobs.
///
/// Boots a guest kernel in a KVM microVM with a serial console, and reports how the guest
/// ended and how long it took to boot. Logs go to stderr; the guest console goes to
/// stdout unless --serial says otherwise.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a VM and run it until the guest resets, powers off or fails.
    ///
    /// Exits 0 when the guest resets or powers off normally (e.g. `reboot` with the
    /// kernel's `reboot=k`) or a `shutdown` request through the API stops it; 128 + N when
    /// signal N (SIGINT, SIGTERM) stops it; 1 on a guest kernel panic, a KVM error or a vCPU
    /// fault.
    ///
    /// Control API (--api PATH): a Unix stream socket. Write one JSON request per line, read
    /// one JSON response line for each, in order; a connection may carry many requests and
    /// many connections may be open at once. Requests: {"cmd":"pause"}, {"cmd":"resume"},
    /// {"cmd":"status"}, {"cmd":"shutdown"}, {"cmd":"snapshot","dir":"/abs/dir"} (add
    /// "resume":false to leave the VM paused after it). Responses: {"ok":true,...} with the
    /// request's fields (e.g. "state":"running"|"paused"), or {"ok":false,"error":"..."}; a
    /// line that is not a request gets an error response. The socket file is removed when
    /// the VM ends. `kiln ctl` is a client for it.
    Run(RunArgs),
    /// Check what kiln needs on this host, one line each, and say what to do about what is
    /// missing.
    ///
    /// Checks: /dev/kvm access; hardware virtualization (a software hypervisor such as PVM
    /// cannot boot a Linux guest); the default guest kernel and agent initramfs ($KILN_HOME,
    /// /usr/lib/kiln, the kernel build cache); cgroup v2 for --slot; TUN for --net; the
    /// nesting server's socket group. Exits 1 if something a default `kiln job` needs is
    /// missing.
    Doctor,
    /// List the VMs kiln runs on this host that have a control API (--api): pid, uptime,
    /// vCPUs, memory, the API and vsock sockets, and the snapshot each was restored from.
    ///
    /// Each such kiln keeps a record in $KILN_RUN_DIR (default /run/kiln/vms for root, else
    /// $XDG_RUNTIME_DIR/kiln/vms) while its VM runs; records of processes that are gone are
    /// dropped.
    Ps(PsArgs),
    /// Send one request to a running VM's control API and print the JSON response.
    ///
    /// Exits 0 if the response says "ok":true; otherwise prints the error and exits 1 (also
    /// when the socket cannot be reached).
    Ctl(CtlArgs),
    /// Restore a VM from a snapshot directory and run it until the guest ends.
    ///
    /// The directory is one `kiln ctl snapshot` wrote. The VM runs as under `kiln run`: same
    /// exit codes, --json report, --api socket, SIGINT/SIGTERM handling.
    ///
    /// Guest memory is mapped from the snapshot's memory file copy-on-write: nothing in the
    /// snapshot directory is written, and restores of one snapshot share its unwritten pages.
    /// If the VM has a vsock device, kiln then waits (up to 30 s, in the background) for
    /// the guest agent and sends it the host's wall-clock time and 32 fresh random bytes,
    /// so that each restored clone has the right clock and its own entropy.
    ///
    /// Disks: each overlay disk's overlay, copied into the snapshot, is copied again for
    /// this clone (--disk-overlay N=PATH, else a private runtime directory removed at the
    /// end), so clones never share a writable overlay. The images must be unchanged, and
    /// in the snapshot directory or the image store, or given again with --disk-image: a
    /// restore opens no other host file the snapshot names. A diff snapshot's parents must
    /// sit in the same directory as it.
    Restore(RestoreArgs),
    /// Start N clones of a snapshot, each a `kiln restore` child process, and wait for them.
    ///
    /// Separate processes share the snapshot's memory file through the page cache (each
    /// maps it copy-on-write and pays only for the pages it writes), and a crash stays in
    /// its clone. Clone i gets the paths PREFIX-i (i = 0..N-1) of each --*-prefix given.
    /// Once all are started (and, with --api-prefix, all answer on their API socket) it
    /// prints one JSON line per clone: {"clone":i,"pid":…,"vsock":…,"api":…,"serial":…};
    /// then, in clone order, one {"clone":i,"exit_code":…} line per clone once it ended. Exits 0 if every clone
    /// exited 0, 128 + N if signal N stopped kiln fork (SIGINT/SIGTERM are forwarded to
    /// every clone), 1 otherwise.
    Fork(ForkArgs),
    /// Run a command in a running VM through its guest agent, streaming its output.
    ///
    /// Exits with the command's exit code (128 + N if signal N killed it). SIGINT and
    /// SIGTERM are passed on to the command's process group in the guest.
    ///
    /// With -t the command runs on a pseudo-terminal in the guest: this terminal is put in
    /// raw mode (restored at the end), every key goes to the guest as typed (Ctrl-C
    /// interrupts the guest's foreground process, Ctrl-D is end of input), and its size
    /// follows this terminal's. -t needs a terminal on stdin, and refuses to run without
    /// one. Without -t the command's stdin is /dev/null.
    Exec(ExecArgs),
    /// Open an interactive shell in a running VM: `kiln exec -t` of the guest's login shell
    /// for root (from its /etc/passwd, else /bin/sh), as a login shell (-l).
    ///
    /// Works the same on a booted VM and on a restored snapshot (`kiln restore … &` then
    /// `kiln shell --vsock …`). Needs a terminal on stdin. Exits with the shell's exit code.
    Shell(ShellArgs),
    /// Copy a file into or out of a running VM: `kiln cp --vsock S ./f vm:/tmp/f` or
    /// `kiln cp --vsock S vm:/etc/os-release ./os-release`.
    ///
    /// A file copied out never gets the setuid, setgid or sticky bit; it gets the guest's
    /// rwx bits less the umask (--preserve-mode: without the umask). It is written to a new
    /// temporary file next to DST and renamed over it, so a failed copy leaves DST as it
    /// was; a DST that is a symbolic link is refused unless --follow-symlinks.
    Cp(CpArgs),
    /// Run one CI job in a fresh VM: boot it, run the script through the guest agent,
    /// stream its output live, tear the VM down, and exit with the script's exit code.
    ///
    /// SIGINT/SIGTERM cancel the job: its process group in the guest gets SIGTERM, then
    /// SIGKILL after a second, and the VM is stopped; kiln job then exits 128 + signal.
    Job(JobArgs),
    /// Run a kiln command (run, job, restore…) in a jail: its own directory as `/`, new
    /// mount, PID, IPC, UTS and network namespaces, `/dev` with only kvm and net/tun, an
    /// unprivileged uid/gid, no capabilities, no inherited fds, rlimits on fds and file size.
    ///
    /// `kiln jail --id job1 --uid 1000 --gid 1000 --file vmlinux --file agent.cpio -- run
    /// --kernel vmlinux --initrd agent.cpio --vsock v.sock` runs the VM with the root
    /// `<base>/job1/root`, where each --file is hard-linked (or copied) under its file name;
    /// paths in the inner arguments are relative to that root, so the vsock socket is
    /// `<base>/job1/root/v.sock` on the host (printed on stderr). Must run as root. Exits
    /// with the inner kiln's exit code (128 + N if signal N killed it); SIGINT/SIGTERM are
    /// forwarded to it; the jail directory is removed at the end unless --keep.
    Jail(JailArgs),
    /// Make, list and remove root-disk images (`kiln image build|import|ls|rm`).
    Image(ImageArgs),
    /// Set up or tear down the host side of a VM network: a persistent TAP with the host's
    /// address (and optionally NAT to the host's other interfaces). Must run as root.
    #[command(subcommand)]
    Net(NetCommand),
}

#[derive(Args, Debug)]
pub struct JailArgs {
    /// The jail's name: its directory `<base>/<ID>` and its hostname (1 to 64 letters,
    /// digits, '-' or '_'). Refused while another jail uses it.
    #[arg(long, value_name = "ID")]
    pub id: String,
    /// The uid the VMM runs as (not 0). Default: a uid of the jail's own from --uid-range.
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,
    /// The range the jail's own uid comes from: START:COUNT, each uid held by at most one
    /// running jail. Default: 1800000000:65536. Use uids no account of the host has.
    #[arg(long, value_name = "START:COUNT", conflicts_with = "uid")]
    pub uid_range: Option<crate::jail::UidRange>,
    /// The gid the VMM runs as (not 0); it gets no supplementary groups. Default: the
    /// number of the uid taken from --uid-range, or 65534 ("nogroup") with --uid.
    #[arg(long, value_name = "GID")]
    pub gid: Option<u32>,
    /// Where jail directories are made. Default: $KILN_JAIL_BASE, else /srv/kiln.
    #[arg(long, value_name = "DIR")]
    pub base: Option<PathBuf>,
    /// A file (or directory, e.g. a snapshot) the VM needs, put in the jail root under its
    /// file name (repeatable).
    #[arg(long, value_name = "HOST_PATH")]
    pub file: Vec<PathBuf>,
    /// A host TAP (see `kiln net setup`) for the VM's `--net tap=NAME` (repeatable): kiln
    /// jail attaches to it in the host's network namespace and hands the VMM only that open
    /// device; the jail's own network namespace stays empty.
    #[arg(long, value_name = "NAME")]
    pub tap: Vec<String>,
    /// A store image for the inner kiln's `--image NAME` (repeatable): its directory is
    /// hard-linked in as `/images/NAME`, and the inner kiln's image store is `/images`.
    #[arg(long, value_name = "NAME")]
    pub image: Vec<String>,
    /// The image store --image names come from. Default: $KILN_IMAGE_STORE, else
    /// /var/lib/kiln/images.
    #[arg(long, value_name = "DIR", requires = "image")]
    pub store: Option<PathBuf>,
    /// Leave the jail directory in place when the VM ends.
    #[arg(long)]
    pub keep: bool,
    /// The VMM's limit on open files (RLIMIT_NOFILE).
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub max_fds: u64,
    /// The largest file the VMM may write, in GiB (RLIMIT_FSIZE; snapshots are files).
    #[arg(long, value_name = "GIB", default_value_t = 64)]
    pub max_file_gib: u64,
    /// The kiln subcommand to run in the jail, and its arguments.
    #[arg(last = true, required = true, value_name = "KILN_ARGS")]
    pub command: Vec<String>,
}

/// Which VM a command runs in, and with what environment and working directory.
#[derive(Args, Debug)]
pub struct ExecTarget {
    /// The VM's vsock Unix socket (what `kiln run --vsock` was given).
    #[arg(long, value_name = "PATH")]
    pub vsock: PathBuf,
    /// Set an environment variable for the command (repeatable). With a terminal, TERM is
    /// this terminal's unless set here.
    #[arg(long, value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the guest (default /).
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    pub target: ExecTarget,
    /// Run the command on a pseudo-terminal in the guest, with this terminal in raw mode.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ShellArgs {
    #[command(flatten)]
    pub target: ExecTarget,
}

#[derive(Args, Debug)]
pub struct CpArgs {
    /// The VM's vsock Unix socket.
    #[arg(long, value_name = "PATH")]
    pub vsock: PathBuf,
    /// Permission bits for a file copied into the guest (default: the source's).
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub mode: Option<u32>,
    /// For a file copied out of the guest: keep the guest's rwx bits as they are. Default:
    /// the guest's rwx bits less the umask. Setuid, setgid and sticky are never kept.
    #[arg(long)]
    pub preserve_mode: bool,
    /// For a file copied out of the guest: if DST is a symbolic link, replace the file it
    /// points to. Default: refuse a DST that is a symbolic link.
    #[arg(long)]
    pub follow_symlinks: bool,
    /// Source: a host path, or vm:/path in the guest.
    pub src: String,
    /// Destination: a host path, or vm:/path in the guest.
    pub dst: String,
}

fn parse_mode(s: &str) -> Result<u32, ValueError> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|source| ValueError::Mode {
        spec: s.into(),
        source,
    })
}

/// A flag value that kiln's own value parsers refuse (clap prints it).
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    #[error(transparent)]
    Net(#[from] crate::net::NetArgError),
    #[error("--net {0:?}: a restored guest keeps its address; give only tap= and mac=")]
    CloneAddress(String),
    #[error("{0:?}: expected N=PATH, e.g. 0=/run/clone0.overlay")]
    DiskPair(String),
    #[error("{spec:?}: disk number {number:?}: {source}")]
    DiskNumber {
        spec: String,
        number: String,
        source: std::num::ParseIntError,
    },
    #[error("{spec:?} is not an octal mode: {source}")]
    Mode {
        spec: String,
        source: std::num::ParseIntError,
    },
}
