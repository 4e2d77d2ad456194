//! What each kind of kiln thread may call, once the VM runs.
//!
//! Collected with `strace -f` over the direct-path and CLI tests (run, API, snapshot,
//! restore, vsock) and reviewed by hand: a list names only what that thread does after its
//! filter is installed, plus what the SIGSYS report itself needs (`write`, `rt_sigaction`,
//! `getpid`, `gettid`, `tgkill`, `rt_sigprocmask`, `rt_sigreturn`). Memory management
//! (`mmap`, `munmap`, `mremap`, `madvise`, `brk`, `mprotect`) is allowed everywhere: the
//! allocator uses it behind every `Vec`; but `mmap` and `mprotect` only without
//! `PROT_EXEC`: nothing in kiln makes code at run time, so an exploit cannot either.
//!
//! What stays, and why:
//! - The event loop may `socket(AF_UNIX)` and `connect`: a guest's vsock connection to host
//!   port N is connected to the Unix socket `<uds>_N` when the guest asks for it.
//! - The event loop keeps the path syscalls (`openat`, `mkdir`, `rename`, `unlink`, …):
//!   snapshots are written on it (into a directory named at request time, through
//!   `create`+`rename` for atomic state files), and after the loop it tears the VM down
//!   (removing sockets and runtime directories). No other thread may make path syscalls.
//! - The agent-client threads `connect` to the VM's own vsock socket to reach the guest agent.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, KVMIO,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

// The KVM ioctls threads make after start-up: the vCPU loop and the state a pause reads,
// and the VM state a snapshot reads.
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);

/// A syscall a thread may make: unconditionally, or only with argument `arg` equal to one
/// of `values`.
pub(super) enum Allowed {
    Any(i64),
    ArgIn {
        syscall: i64,
        arg: u8,
        values: Vec<u64>,
    },
}

use Allowed::{Any, ArgIn};

/// Everything any running thread needs: memory, locks, signals, time, exit, the SIGSYS
/// report.
fn common() -> Vec<Allowed> {
    [
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_getrandom,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_tgkill,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_fcntl,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_restart_syscall,
    ]
    .into_iter()
    .map(Any)
    .chain([
        // Memory, never executable: `prot` (argument 2) without PROT_EXEC.
        ArgIn {
            syscall: libc::SYS_mmap,
            arg: 2,
            values: NOT_EXEC.to_vec(),
        },
        ArgIn {
            syscall: libc::SYS_mprotect,
            arg: 2,
            values: NOT_EXEC.to_vec(),
        },
        ArgIn {
            // Thread names: set by a spawning thread, read by the SIGSYS report.
            syscall: libc::SYS_prctl,
            arg: 0,
            values: vec![libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64],
        },
        // Rotating a capped console or log file (`logcap.rs`), from whichever thread writes
        // the line: read the old contents, empty the file (length 0 only).
        Any(libc::SYS_pread64),
        ArgIn {
            syscall: libc::SYS_ftruncate,
            arg: 1,
            values: vec![0],
        },
    ])
    .collect()
}

/// Every `prot` value without PROT_EXEC.
const NOT_EXEC: [u64; 4] = [
    libc::PROT_NONE as u64,
    libc::PROT_READ as u64,
    libc::PROT_WRITE as u64,
    (libc::PROT_READ | libc::PROT_WRITE) as u64,
];

fn ioctls(values: Vec<u64>) -> Allowed {
    ArgIn {
        syscall: libc::SYS_ioctl,
        arg: 1,
        values,
    }
}

/// Terminal and socket ioctls the standard library makes (`isatty`, `set_nonblocking`).
fn stdlib_ioctls() -> Vec<u64> {
    vec![libc::TCGETS, libc::FIONBIO]
}

/// A vCPU thread: KVM_RUN and the exits it handles (device emulation on the buses: console
/// writes, eventfd signals), and the state reads of a pause.
pub(super) fn vcpu() -> Vec<Allowed> {
    let mut list = common();
    list.push(ioctls(vec![
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_MSRS(),
        KVM_GET_LAPIC(),
        KVM_GET_CPUID2(),
        KVM_GET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_XSAVE(),
        KVM_GET_XSAVE2(),
        KVM_GET_XCRS(),
    ]));
    list.extend([libc::SYS_writev, libc::SYS_read].into_iter().map(Any));
    list
}

/// The VMM's event loop thread (and what it does after the VM ends): device I/O on the
/// host's sockets and files, snapshots written to disk, the teardown.
pub(super) fn vmm() -> Vec<Allowed> {
    let mut list = common();
    let mut kvm = vec![
        KVM_GET_IRQCHIP(),
        KVM_GET_PIT2(),
        KVM_GET_CLOCK(),
        KVM_GET_DIRTY_LOG(),
    ];
    kvm.extend(stdlib_ioctls());
    list.push(ioctls(kvm));
    list.push(ArgIn {
        syscall: libc::SYS_socket,
        arg: 0,
        values: vec![libc::AF_UNIX as u64],
    });
    list.extend(
        [
            // The event loop and device I/O.
            libc::SYS_epoll_create1,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_eventfd2,
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_fallocate,
            libc::SYS_lseek,
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_shutdown,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_getsockopt,
            libc::SYS_poll,
            libc::SYS_ppoll,
            // Snapshots: the directory, the files, their names.
            libc::SYS_getcwd,
            libc::SYS_mkdir,
            libc::SYS_mkdirat,
            libc::SYS_openat,
            libc::SYS_statx,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_ftruncate,
            libc::SYS_rename,
            libc::SYS_renameat,
            libc::SYS_renameat2,
            libc::SYS_copy_file_range,
            libc::SYS_sendfile,
            libc::SYS_fchmod,
            // Teardown: sockets and runtime files removed.
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_getdents64,
            libc::SYS_rmdir,
        ]
        .into_iter()
        .map(Any),
    );
    list
}

/// The control API's threads: accept, read requests, hand them to the event loop, answer;
/// a thread per connection.
pub(super) fn api() -> Vec<Allowed> {
    let mut list = common();
    list.push(ioctls(stdlib_ioctls()));
    list.extend(
        [
            libc::SYS_accept4,
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_writev,
            libc::SYS_shutdown,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
            // A thread per connection.
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_sched_getaffinity,
            // The socket file is removed at the end.
            libc::SYS_unlink,
            libc::SYS_statx,
            libc::SYS_newfstatat,
        ]
        .into_iter()
        .map(Any),
    );
    list
}

/// The signal thread: blocks reading signal-hook's socket, then stops the VM (an eventfd
/// write). Every thread that does not block SIGINT/SIGTERM may run signal-hook's handler,
/// which wakes this one with `send` (`sendto`), so that is here too.
pub(super) fn signals() -> Vec<Allowed> {
    let mut list = common();
    list.extend(
        [
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_poll,
            libc::SYS_ppoll,
        ]
        .into_iter()
        .map(Any),
    );
    list
}

/// An agent-client thread: connects to the VM's vsock Unix socket and talks to the guest
/// agent (a restored guest's clock, entropy and identity; a cancelled job's signal), with
/// timeouts and retries; the signal thread's calls too (the job's signal thread is one).
pub(super) fn agent_client() -> Vec<Allowed> {
    let mut list = signals();
    list.push(ioctls(stdlib_ioctls()));
    list.push(ArgIn {
        syscall: libc::SYS_socket,
        arg: 0,
        values: vec![libc::AF_UNIX as u64],
    });
    list.extend(
        [
            libc::SYS_connect,
            libc::SYS_writev,
            libc::SYS_readv,
            libc::SYS_sendmsg,
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
            libc::SYS_shutdown,
        ]
        .into_iter()
        .map(Any),
    );
    list
}
