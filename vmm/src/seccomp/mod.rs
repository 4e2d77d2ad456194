//! seccomp: each of kiln's threads, once the VM runs, may make only the syscalls its kind
//! needs (`allowlists.rs`): the vCPU threads, the event loop (which also tears the VM down),
//! the control API's threads, the signal thread (SIGINT/SIGTERM stop the VM), and the
//! agent-client threads (the restored guest's clock and entropy refresh, a cancelled job's
//! signal to the guest). Set-up (opening files, creating the VM, mapping memory, spawning
//! threads) happens before any filter is installed, so it is not constrained; helper
//! threads start through [`spawn_filtered`], which installs the filter before anything else.
//!
//! No thread may map or protect memory as executable, only the event loop and the
//! agent-client threads may connect Unix sockets (see `allowlists.rs` for why), and only the
//! event loop may make path syscalls.
//!
//! A syscall outside a thread's list traps: a SIGSYS handler writes one line naming the
//! syscall and the thread to stderr, then lets SIGSYS kill the process (as
//! `SECCOMP_RET_KILL_PROCESS` would, but with a report). `--no-seccomp` turns it off for
//! debugging and says so loudly.

mod allowlists;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use allowlists::Allowed;

/// The kinds of thread kiln filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    Vmm,
    Api,
    /// Waits for SIGINT/SIGTERM and stops the VM.
    Signals,
    /// Talks to the guest agent through the vsock Unix socket.
    AgentClient,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {0:?} thread's seccomp filter: {1}")]
    Build(ThreadKind, seccompiler::BackendError),
    #[error("cannot compile the {0:?} thread's seccomp filter: {1}")]
    Compile(ThreadKind, seccompiler::BackendError),
    #[error("cannot install the {0:?} thread's seccomp filter: {1}")]
    Install(ThreadKind, seccompiler::Error),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    /// Compiling the filters failed once in this process; every later caller gets that.
    #[error(transparent)]
    Earlier(Arc<SeccompError>),
}

/// The compiled filters, shared by the threads that install them.
#[derive(Clone)]
pub struct Filters {
    vcpu: Arc<BpfProgram>,
    vmm: Arc<BpfProgram>,
    api: Arc<BpfProgram>,
    signals: Arc<BpfProgram>,
    agent_client: Arc<BpfProgram>,
}

impl Filters {
    /// Compiles the filters (once per process; later calls share them).
    pub fn get() -> Result<Filters, SeccompError> {
        static FILTERS: OnceLock<Result<Filters, Arc<SeccompError>>> = OnceLock::new();
        FILTERS
            .get_or_init(|| Filters::compile().map_err(Arc::new))
            .clone()
            .map_err(SeccompError::Earlier)
    }

    fn compile() -> Result<Filters, SeccompError> {
        Ok(Filters {
            vcpu: Arc::new(compile(ThreadKind::Vcpu, allowlists::vcpu())?),
            vmm: Arc::new(compile(ThreadKind::Vmm, allowlists::vmm())?),
            api: Arc::new(compile(ThreadKind::Api, allowlists::api())?),
            signals: Arc::new(compile(ThreadKind::Signals, allowlists::signals())?),
            agent_client: Arc::new(compile(
                ThreadKind::AgentClient,
                allowlists::agent_client(),
            )?),
        })
    }

    /// Installs `kind`'s filter on the calling thread (and the threads it spawns later).
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        install_sigsys_handler()?;
        let program = match kind {
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::Vmm => &self.vmm,
            ThreadKind::Api => &self.api,
            ThreadKind::Signals => &self.signals,
            ThreadKind::AgentClient => &self.agent_client,
        };
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(kind, e))
    }
}

/// Spawns a thread named `name` that installs `kind`'s filter (when `filters` is given,
/// i.e. seccomp is on) before it runs `f`. If the filter cannot be installed, the thread
/// says so and ends without running `f`: no kiln thread runs unfiltered by accident.
pub fn spawn_filtered<T: Send + 'static>(
    filters: Option<&Filters>,
    kind: ThreadKind,
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<Option<T>>> {
    let filters = filters.cloned();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Some(filters) = filters {
                if let Err(e) = filters.install(kind) {
                    tracing::error!("{e}; the thread does not run");
                    return None;
                }
            }
            Some(f())
        })
}

fn compile(kind: ThreadKind, list: Vec<Allowed>) -> Result<BpfProgram, SeccompError> {
    let build = |e| SeccompError::Build(kind, e);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for allowed in list {
        match allowed {
            Allowed::Any(nr) => {
                rules.insert(nr, Vec::new());
            }
            Allowed::ArgIn {
                syscall,
                arg,
                values,
            } => {
                let mut conditions = Vec::with_capacity(values.len());
                for value in values {
                    let condition = SeccompCondition::new(
                        arg,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        value & 0xffff_ffff,
                    )
                    .map_err(build)?;
                    conditions.push(SeccompRule::new(vec![condition]).map_err(build)?);
                }
                rules.insert(syscall, conditions);
            }
        }
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(|e| SeccompError::Compile(kind, e))
}

/// Installs [`on_sigsys`] once per process.
fn install_sigsys_handler() -> Result<(), SeccompError> {
    // The errno of a failed sigaction, for every later caller.
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            // SAFETY: an all-zero sigaction is a valid value to fill in.
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_sigsys as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            // SAFETY: `action` is initialised, `on_sigsys` has the SA_SIGINFO signature and
            // only makes async-signal-safe calls.
            if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
                let errno = std::io::Error::last_os_error().raw_os_error();
                return Err(errno.unwrap_or(libc::EINVAL));
            }
            Ok(())
        })
        .map_err(|errno| SeccompError::Handler(std::io::Error::from_raw_os_error(errno)))
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` on x86_64 (after si_signo, si_errno,
/// si_code, padding and si_call_addr).
const SI_SYSCALL_OFFSET: usize = 24;

/// Reports the forbidden syscall and the thread that made it, then lets SIGSYS kill the
/// process. Only async-signal-safe calls, each of them in every thread's allow-list.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; si_syscall is an int at this
    // offset in the x86_64 layout.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let mut line = [0u8; 160];
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        for &b in bytes {
            if len < line.len() {
                line[len] = b;
                len += 1;
            }
        }
    };
    push(b"kiln: seccomp: syscall ");
    push(decimal(nr).as_slice());
    push(b" is outside the filter of thread '");
    let mut name = [0u8; 16];
    // SAFETY: prctl(PR_GET_NAME) writes at most 16 bytes into `name`. (prctl may itself be
    // filtered; then the name stays empty.)
    let _ = unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    push(name.split(|&b| b == 0).next().unwrap_or(&[]));
    push(b"'; killing the process (--no-seccomp turns filtering off)\n");
    // SAFETY: write(2) of an initialised buffer to stderr; SIG_DFL then raise: the signal
    // is blocked while this handler runs and kills the process once it returns.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::raise(libc::SIGSYS);
    }
}

/// `n` in decimal, in a fixed buffer (no allocation in a signal handler).
fn decimal(n: i32) -> DecimalBuf {
    let mut buf = [0u8; 12];
    let mut at = buf.len();
    let negative = n < 0;
    let mut v = n.unsigned_abs();
    loop {
        at -= 1;
        buf[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if negative {
        at -= 1;
        buf[at] = b'-';
    }
    DecimalBuf { buf, at }
}

struct DecimalBuf {
    buf: [u8; 12],
    at: usize,
}

impl DecimalBuf {
    fn as_slice(&self) -> &[u8] {
        &self.buf[self.at..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        let filters = Filters::get().unwrap();
        for program in [
            &filters.vcpu,
            &filters.vmm,
            &filters.api,
            &filters.signals,
            &filters.agent_client,
        ] {
            assert!(!program.is_empty());
        }
    }

    #[test]
    fn decimals() {
        assert_eq!(decimal(0).as_slice(), b"0");
        assert_eq!(decimal(231).as_slice(), b"231");
        assert_eq!(decimal(-17).as_slice(), b"-17");
        assert_eq!(decimal(i32::MIN).as_slice(), b"-2147483648");
    }
}
