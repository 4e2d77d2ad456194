//! The signals of a vCPU thread: the kick that brings it out of KVM_RUN, and the mask that
//! keeps every other signal away from it.

use std::cell::Cell;
use std::sync::Once;

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// The signal used to kick a vCPU thread out of KVM_RUN.
pub(super) fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    pub(super) static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer was set by this same thread to its own vCPU's kvm_run mapping,
        // which lives as long as the VcpuFd the thread owns; it is reset to null before the
        // VcpuFd is dropped. A volatile byte write is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

pub(super) fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), handle_kick) {
            tracing::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

/// Blocks, in this vCPU thread, every signal but the kick and the faults the thread may cause
/// itself. A signal sent to the process (a runner's SIGTERM cancelling a job, SIGINT) then
/// goes to a thread that handles it: its handler, run here, would make a syscall this
/// thread's seccomp filter refuses (signal-hook's `sendto`), and the process would die of
/// SIGSYS instead of stopping the VM. Called before the filter is installed, so a signal
/// that lands in between is still handled normally.
pub(super) fn block_process_signals() {
    // SAFETY: sigfillset initializes the zeroed set before it is read; pthread_sigmask
    // changes only this thread's mask and writes no old mask (null).
    let blocked = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for keep in [
            kick_signal(),
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGFPE,
            libc::SIGILL,
            libc::SIGSYS,
            libc::SIGABRT,
            libc::SIGTRAP,
        ] {
            libc::sigdelset(&mut set, keep);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if blocked != 0 {
        tracing::warn!(
            "cannot block process signals in a vCPU thread: {}",
            std::io::Error::from_raw_os_error(blocked)
        );
    }
}
