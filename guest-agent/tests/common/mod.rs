//! Shared set-up: a server in this process, connections to it over Unix socket pairs.
//!
//! Each test binary is its own process with its own reaper; nothing here waits for child
//! processes any other way (no `std::process::Command`).
#![allow(dead_code)]

use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use kiln_agent::client::Client;
use kiln_agent::server::{ConnectionError, Server, System};

/// Records the machine-wide actions instead of performing them.
#[derive(Clone, Default)]
pub struct FakeSystem(pub Arc<Mutex<Vec<String>>>);

impl System for FakeSystem {
    fn set_time(&self, unix_nanos: u64) -> io::Result<()> {
        self.0.lock().unwrap().push(format!("time {unix_nanos}"));
        Ok(())
    }
    fn add_entropy(&self, bytes: &[u8]) -> io::Result<()> {
        self.0
            .lock()
            .unwrap()
            .push(format!("entropy {}", bytes.len()));
        Ok(())
    }
    fn shutdown(&self) -> io::Result<()> {
        self.0.lock().unwrap().push("shutdown".into());
        Ok(())
    }
}

/// A server with a fake system. Makes this process a child subreaper first, so that
/// orphans of execs are re-parented to it (and reaped by its reaper), as in the guest.
pub fn server() -> (Arc<Server>, FakeSystem) {
    static SUBREAPER: Once = Once::new();
    SUBREAPER.call_once(|| {
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER only sets a flag on this process.
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(r, 0, "prctl: {}", io::Error::last_os_error());
    });
    let system = FakeSystem::default();
    (Server::new(system.clone()), system)
}

/// A connection to `server`: the server side runs on a thread whose handle is returned.
pub fn connect(server: &Arc<Server>) -> (Client, JoinHandle<Result<(), ConnectionError>>) {
    let (client, handle) = raw_connect(server);
    (Client::from_stream(client), handle)
}

/// Like [`connect`], with the plain client end of the socket.
pub fn raw_connect(server: &Arc<Server>) -> (UnixStream, JoinHandle<Result<(), ConnectionError>>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let server = Arc::clone(server);
    let handle = thread::spawn(move || {
        let reader = theirs.try_clone().unwrap();
        server.serve_connection(reader, theirs)
    });
    (ours, handle)
}

/// A fresh directory under the system's temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kiln-agent-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A sink that forwards every write to a channel (to learn that output has arrived).
pub struct ChannelWriter(pub mpsc::Sender<Vec<u8>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = self.0.send(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Waits until process `pid` has ended (or `timeout` passes) through a pidfd: no polling.
/// The pidfd must be opened while the process is still known to exist.
pub struct PidFd(OwnedFd);

impl PidFd {
    pub fn open(pid: i32) -> PidFd {
        // SAFETY: pidfd_open creates a descriptor (owned below) and reads nothing.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        assert!(fd >= 0, "pidfd_open({pid}): {}", io::Error::last_os_error());
        // SAFETY: the descriptor was just created and nothing else owns it.
        PidFd(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap()) })
    }

    /// True if the process ended within `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap();
        // SAFETY: poll reads and writes the one pollfd, which lives across the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        n == 1
    }
}

/// Pids of the processes in process group `pgid` that have not ended (zombies excluded).
pub fn live_members(pgid: i32) -> Vec<i32> {
    live_with(2, pgid)
}

/// Pids of the processes of session `sid` that have not ended (zombies excluded).
pub fn session_members(sid: i32) -> Vec<i32> {
    live_with(3, sid)
}

/// Pids of the live processes whose `field` of /proc/PID/stat after the command's name
/// (0: state, 1: ppid, 2: pgrp, 3: session) is `id`.
fn live_with(field: usize, id: i32) -> Vec<i32> {
    let mut live = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue; // ended meanwhile
        };
        // "pid (comm) state ppid pgrp session …"; comm may hold anything, so split after
        // the ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > field
            && fields[0] != "Z"
            && fields[0] != "X"
            && fields[field] == id.to_string()
        {
            live.push(pid);
        }
    }
    live
}

/// `seq 1 n` output, built here to compare with the real thing.
pub fn seq(n: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 1..=n {
        writeln!(out, "{i}").unwrap();
    }
    out
}

/// FNV-1a, 64-bit: a checksum for messages about large outputs.
pub fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
