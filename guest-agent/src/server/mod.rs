//! The agent's side of the protocol, on any byte stream.
//!
//! [`Server::serve_connection`] handles one connection (vsock in the guest, a Unix socket
//! pair in tests) until the client closes it or breaks the protocol; each connection gets a
//! thread of its own ([`Server::spawn_connection`]). What touches the machine as a whole
//! (clock, entropy, reboot) goes through [`System`], so tests can stand in for it.

mod conn;
mod exec;
mod files;
mod pty;
pub mod reaper;
pub mod spawn;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;

use crate::protocol::{self, Frame, Kind, ProtocolError, SignalRequest, SignalTarget};
use reaper::Reaper;

/// Machine-wide actions the agent performs on request.
pub trait System: Send + Sync + 'static {
    /// Sets the wall clock to `unix_nanos` nanoseconds since the epoch.
    fn set_time(&self, unix_nanos: u64) -> io::Result<()>;
    /// Adds `bytes` to the kernel's entropy pool.
    fn add_entropy(&self, bytes: &[u8]) -> io::Result<()>;
    /// Syncs and reboots (called after the `Ok` is sent). The guest's implementation
    /// returns only if that failed.
    fn shutdown(&self) -> io::Result<()>;
}

/// Why a connection was closed by the agent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// A frame could not be read or written.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A well-formed frame that does not fit the conversation.
    #[error("{0}")]
    Unexpected(String),
}

/// The agent: shared by all connections.
pub struct Server {
    system: Box<dyn System>,
    reaper: &'static Reaper,
    /// Running execs: id → process group.
    execs: Mutex<HashMap<u64, libc::pid_t>>,
    next_exec: AtomicU64,
    next_connection: AtomicU64,
}

impl Server {
    /// A server that uses `system` for machine-wide actions and the process's reaper.
    pub fn new(system: impl System) -> Arc<Server> {
        Arc::new(Server {
            system: Box::new(system),
            reaper: Reaper::global(),
            execs: Mutex::new(HashMap::new()),
            next_exec: AtomicU64::new(1),
            next_connection: AtomicU64::new(1),
        })
    }

    /// Serves one connection until the client closes it (`Ok`) or breaks the protocol
    /// (the error, also logged and sent to the client as `Error`). `reader` and `writer` are
    /// the two directions of the same stream. A running exec is killed if the client goes.
    pub fn serve_connection(
        self: &Arc<Self>,
        reader: impl Read,
        writer: impl Write + Send + 'static,
    ) -> Result<(), ConnectionError> {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let result = conn::serve(self, id, reader, Sender::new(writer));
        if let Err(e) = &result {
            crate::say!("connection {id}: {e}; closing it");
        }
        result
    }

    /// Serves the connection on a thread of its own.
    pub fn spawn_connection<R, W>(self: &Arc<Self>, reader: R, writer: W)
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let server = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name("connection".into())
            .spawn(move || server.serve_connection(reader, writer));
        if let Err(e) = spawned {
            crate::say!("starting a connection thread: {e}; dropping the connection");
        }
    }

    /// Sends a signal to an exec's process group or to one process.
    fn signal(&self, req: &SignalRequest) -> Result<(), String> {
        if !(0..=64).contains(&req.signo) {
            return Err(format!("{} is not a signal number", req.signo));
        }
        let (result, what) = match req.target {
            SignalTarget::Exec(id) => {
                let Some(&pgid) = self.execs().get(&id) else {
                    return Err(format!("no running exec with id {id}"));
                };
                // SAFETY: killpg only sends a signal.
                (
                    unsafe { libc::killpg(pgid, req.signo) },
                    format!("exec {id}"),
                )
            }
            SignalTarget::Pid(pid) if pid <= 1 => {
                return Err(format!(
                    "refusing to signal pid {pid}: not a single job process"
                ));
            }
            SignalTarget::Pid(pid) => {
                // SAFETY: kill only sends a signal; pid > 1 names one process.
                (unsafe { libc::kill(pid, req.signo) }, format!("pid {pid}"))
            }
        };
        if result != 0 {
            let e = io::Error::last_os_error();
            return Err(format!("signalling {what}: {e}"));
        }
        Ok(())
    }

    fn execs(&self) -> MutexGuard<'_, HashMap<u64, libc::pid_t>> {
        self.execs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The writing half of a connection, shared by the threads that answer on it; each frame
/// is written whole under the lock.
#[derive(Clone)]
struct Sender(Arc<Mutex<Box<dyn Write + Send>>>);

impl Sender {
    fn new(writer: impl Write + Send + 'static) -> Self {
        Sender(Arc::new(Mutex::new(Box::new(writer))))
    }

    fn lock(&self) -> MutexGuard<'_, Box<dyn Write + Send>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn frame(&self, frame: &Frame) -> Result<(), ProtocolError> {
        let bytes = protocol::encode(frame)?;
        PatientWriter(&mut **self.lock()).write_all(&bytes)?;
        Ok(())
    }

    fn raw(&self, kind: Kind, body: &[u8]) -> Result<(), ProtocolError> {
        protocol::write_raw(&mut PatientWriter(&mut **self.lock()), kind, body)
    }

    /// Sends `Error` with `message`, cut to a size that always fits in a frame.
    fn error(&self, message: &str) -> Result<(), ProtocolError> {
        let mut end = message.len().min(64 * 1024);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.frame(&Frame::error(&message[..end]))
    }
}

/// A writer that waits out a transient lack of kernel memory: an AF_VSOCK send whose
/// packet buffer cannot be allocated fails with ENOMEM (or ENOBUFS) before any byte is
/// sent, and a job's output must not be cut off by that. Other errors pass through.
struct PatientWriter<'a>(&'a mut (dyn Write + Send));

impl PatientWriter<'_> {
    /// Retries for about this long in all before giving up.
    const PATIENCE_MS: u64 = 30_000;
}

impl Write for PatientWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (mut waited_ms, mut backoff_ms) = (0, 1);
        loop {
            match self.0.write(buf) {
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::ENOMEM | libc::ENOBUFS))
                        && waited_ms < Self::PATIENCE_MS =>
                {
                    if waited_ms == 0 {
                        crate::say!("vsock send: {e}; retrying");
                    }
                    // Backing off while the kernel reclaims memory; nothing to wait on.
                    std::thread::sleep(std::time::Duration::from_millis(backoff_ms));
                    waited_ms += backoff_ms;
                    backoff_ms = (backoff_ms * 2).min(100);
                }
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Time since boot (CLOCK_BOOTTIME) in milliseconds.
fn uptime_ms() -> u64 {
    // SAFETY: timespec is plain data; all-zero is a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime writes only to `ts`.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let millis = u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000_000;
    secs.saturating_mul(1000).saturating_add(millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails with `errno` `failures` times, then takes everything.
    struct Flaky {
        errno: i32,
        failures: usize,
        got: Vec<u8>,
    }

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.failures > 0 {
                self.failures -= 1;
                return Err(io::Error::from_raw_os_error(self.errno));
            }
            self.got.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn sends_wait_out_a_lack_of_memory_but_not_other_errors() {
        let mut flaky = Flaky {
            errno: libc::ENOMEM,
            failures: 3,
            got: Vec::new(),
        };
        PatientWriter(&mut flaky).write_all(b"output").unwrap();
        assert_eq!(flaky.got, b"output");

        let mut broken = Flaky {
            errno: libc::EPIPE,
            failures: 1,
            got: Vec::new(),
        };
        let e = PatientWriter(&mut broken).write_all(b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPIPE));
    }
}
