//! Reaching the agent when the guest drops connections silently, as it does right after a
//! snapshot restore (before it has handled the vsock transport reset): the handshake times
//! out with a clear error, and `wait_ready` and `connect_ready` retry.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{server, TempDir};
use kiln_agent::client::{
    connect_ready, wait_ready, Client, ClientError, ATTEMPT_TIMEOUT, HANDSHAKE_TIMEOUT,
};
use kiln_agent::protocol::{ExecRequest, VERSION};

/// What the fake VMM does with one connection.
#[derive(Clone, Copy)]
enum Conn {
    /// Reads the CONNECT line and never answers (the guest dropped the request).
    Silent,
    /// Answers OK, then holds the connection without passing anything on (the guest
    /// dropped the connection after accepting it).
    OkThenSilent,
    /// Answers OK, then closes (the guest reset the connection).
    OkThenClose,
    /// Answers OK and splices to a real agent.
    Serve,
}

/// A stand-in for the VMM's hybrid-vsock socket that treats its connections as `script`
/// says, then serves every further one. Returns the socket's path and a count of the
/// connections accepted.
fn fake_vmm(dir: &TempDir, script: Vec<Conn>) -> (String, Arc<AtomicUsize>) {
    let (server, _) = server();
    let path = dir.path("vm.vsock");
    let listener = UnixListener::bind(&path).unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    thread::spawn(move || {
        let mut held = Vec::new(); // silent connections stay open
        for (i, stream) in listener.incoming().enumerate() {
            seen.fetch_add(1, Ordering::SeqCst);
            let mut stream: UnixStream = stream.unwrap();
            let mut line = Vec::new();
            let mut b = [0u8];
            while line.last() != Some(&b'\n') && stream.read(&mut b).unwrap_or(0) == 1 {
                line.push(b[0]);
            }
            assert_eq!(line, b"CONNECT 1024\n");
            match script.get(i).copied().unwrap_or(Conn::Serve) {
                Conn::Silent => held.push(stream),
                Conn::OkThenSilent => {
                    stream.write_all(b"OK 1073741824\n").unwrap();
                    held.push(stream);
                }
                Conn::OkThenClose => stream.write_all(b"OK 1073741824\n").unwrap(),
                Conn::Serve => {
                    stream.write_all(b"OK 1073741824\n").unwrap();
                    server.spawn_connection(stream.try_clone().unwrap(), stream);
                }
            }
        }
    });
    (path, count)
}

#[test]
fn a_silent_handshake_times_out_with_a_clear_error() {
    let dir = TempDir::new();
    let (uds, _) = fake_vmm(&dir, vec![Conn::Silent; 2]);

    let t0 = Instant::now();
    let err =
        Client::connect_with_timeouts(Path::new(&uds), 1024, Duration::from_millis(200), None)
            .err()
            .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    match &err {
        ClientError::HandshakeTimeout { port, timeout, .. } => {
            assert_eq!((*port, *timeout), (1024, Duration::from_millis(200)))
        }
        other => panic!("{other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("no answer to CONNECT 1024") && msg.contains("within 200ms"),
        "{msg}"
    );
    assert!(msg.contains("connect again"), "{msg}");

    // The plain connect is bounded by the default.
    let t0 = Instant::now();
    match Client::connect_unix(&uds, 1024) {
        Err(ClientError::HandshakeTimeout { timeout, .. }) => {
            assert_eq!(timeout, HANDSHAKE_TIMEOUT)
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    let waited = t0.elapsed();
    assert!(
        waited >= HANDSHAKE_TIMEOUT && waited < HANDSHAKE_TIMEOUT * 3,
        "{waited:?}"
    );
}

#[test]
fn wait_ready_retries_a_connection_the_guest_dropped() {
    let dir = TempDir::new();
    let (uds, count) = fake_vmm(&dir, vec![Conn::Silent]);
    let t0 = Instant::now();
    let pong = wait_ready(&uds, 1024, Duration::from_secs(30)).unwrap();
    assert_eq!(pong.version, VERSION);
    assert_eq!(count.load(Ordering::SeqCst), 2);
    // One abandoned attempt, not the whole timeout.
    assert!(t0.elapsed() < ATTEMPT_TIMEOUT * 3, "{:?}", t0.elapsed());
}

#[test]
fn wait_ready_retries_a_connection_dropped_after_the_handshake() {
    let dir = TempDir::new();
    let (uds, count) = fake_vmm(&dir, vec![Conn::OkThenSilent, Conn::OkThenClose]);
    let pong = wait_ready(&uds, 1024, Duration::from_secs(30)).unwrap();
    assert_eq!(pong.version, VERSION);
    assert_eq!(count.load(Ordering::SeqCst), 3);
}

#[test]
fn wait_ready_gives_up_at_its_deadline() {
    let dir = TempDir::new();
    let (uds, _) = fake_vmm(&dir, vec![Conn::Silent; 100]);
    let t0 = Instant::now();
    let err = wait_ready(&uds, 1024, Duration::from_millis(300)).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    let msg = err.to_string();
    assert!(matches!(err, ClientError::NotReady { .. }), "{msg}");
    assert!(msg.contains("no answer to CONNECT 1024"), "{msg}");
}

#[test]
fn connect_ready_retries_then_runs_the_exec_once_without_a_timeout() {
    let dir = TempDir::new();
    let (uds, count) = fake_vmm(&dir, vec![Conn::Silent, Conn::OkThenClose]);
    let mut client = connect_ready(&uds, 1024, Duration::from_secs(10)).unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 3);

    // Silent for longer than an attempt: the connection has no timeout any more.
    let marks = dir.path("runs");
    let script = format!("echo run >> {marks}; sleep 3; echo done");
    let mut out = Vec::new();
    let status = client
        .exec(
            &ExecRequest::new(["sh", "-c", &script]),
            &mut out,
            &mut Vec::new(),
        )
        .unwrap();
    assert!(status.success());
    assert_eq!(out, b"done\n");
    assert_eq!(std::fs::read_to_string(&marks).unwrap(), "run\n");
    assert_eq!(count.load(Ordering::SeqCst), 3);
}

#[test]
fn connect_ready_is_bounded_and_does_not_retry_what_a_retry_cannot_cure() {
    let dir = TempDir::new();
    let (uds, count) = fake_vmm(&dir, vec![Conn::Silent; 100]);
    let t0 = Instant::now();
    let err = connect_ready(&uds, 1024, Duration::from_millis(500))
        .err()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(matches!(err, ClientError::HandshakeTimeout { .. }), "{err}");
    assert!(count.load(Ordering::SeqCst) >= 1);

    // No socket: fails at once.
    let t0 = Instant::now();
    let err = connect_ready(dir.path("nothing-here"), 1024, Duration::from_secs(10))
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}
