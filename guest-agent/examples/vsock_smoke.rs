//! Smoke test of the agent as the guest's PID 1, without a VMM vsock device.
//!
//! Put this (built static) into a guest image and run it from `/etc/kiln/rc`: it reaches
//! the agent over the vsock loopback transport (CID 1, `CONFIG_VSOCKETS_LOOPBACK`), runs a
//! few requests through [`kiln_agent::client`] and prints `SMOKE <check> ok` per check, then
//! `SMOKE done` (or `SMOKE FAILED: …` and exit code 1).
//!
//! ```text
//! RUSTFLAGS='-C target-feature=+crt-static' cargo build --release \
//!     --target x86_64-unknown-linux-gnu -p kiln-agent --example vsock_smoke
//! ```

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;

use kiln_agent::client::{Client, ExecIo};
use kiln_agent::protocol::{ExecRequest, ExitStatus, SignalTarget, Started, AGENT_PORT};

/// Connects to the agent over vsock loopback. The socket is handed to the client as a
/// `UnixStream`: std uses only read/write/shutdown/dup on it, which a vsock stream socket
/// supports the same way.
fn connect() -> io::Result<Client> {
    // SAFETY: socket only creates a descriptor, owned right below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is valid and the fields are set below.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).map_err(io::Error::other)?;
    addr.svm_port = AGENT_PORT;
    addr.svm_cid = libc::VMADDR_CID_LOCAL;
    let len =
        libc::socklen_t::try_from(size_of::<libc::sockaddr_vm>()).map_err(io::Error::other)?;
    // SAFETY: connect reads `len` bytes from `addr`, which lives across the call.
    if unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&raw const addr).cast(),
            len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(Client::from_stream(UnixStream::from(fd)))
}

fn check(name: &str, ok: bool, detail: impl std::fmt::Debug) -> Result<(), String> {
    if ok {
        println!("SMOKE {name} ok");
        Ok(())
    } else {
        Err(format!("{name}: {detail:?}"))
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut client = connect()?;
    let pong = client.ping()?;
    check("ping", pong.version == kiln_agent::protocol::VERSION, &pong)?;

    let (mut out, mut err) = (Vec::new(), Vec::new());
    let req = ExecRequest::new(["sh", "-c", "echo out; echo err >&2; echo $KILN_X; exit 42"])
        .env("KILN_X", "y");
    let status = client.exec(&req, &mut out, &mut err)?;
    check(
        "exec",
        status == ExitStatus::Code(42) && out == b"out\ny\n" && err == b"err\n",
        (status, &out, &err),
    )?;

    let status = client.exec(
        &ExecRequest::new(["sh", "-c", "kill -9 $$"]),
        &mut io::sink(),
        &mut io::sink(),
    )?;
    check("signal-status", status == ExitStatus::Signal(9), status)?;

    let mut out = Vec::new();
    let req = ExecRequest::new([
        "sh",
        "-c",
        "i=0; while [ $i -lt 20000 ]; do echo line-$i; i=$((i+1)); done",
    ]);
    client.exec(&req, &mut out, &mut io::sink())?;
    let want: String = (0..20000).map(|i| format!("line-{i}\n")).collect();
    check("output", out == want.as_bytes(), out.len())?;

    let data: Vec<u8> = (0..300_000u32).map(|i| i.to_le_bytes()[0]).collect();
    client.put_file("/tmp/smoke.bin", 0o640, &mut data.as_slice())?;
    let mut back = Vec::new();
    let info = client.get_file("/tmp/smoke.bin", &mut back)?;
    check("files", back == data && info.mode == 0o640, info)?;

    // Cancel from another connection: the whole process group goes.
    let (tx, rx) = mpsc::channel();
    let exec = thread::spawn(move || {
        let mut on_started = |s: Started| {
            let _ = tx.send(s);
        };
        let io = ExecIo {
            stdin: None,
            stdout: &mut io::sink(),
            stderr: &mut io::sink(),
            on_started: Some(&mut on_started),
        };
        client.exec_with(
            &ExecRequest::new(["sh", "-c", "sleep 1000 & sleep 1000"]),
            io,
        )
    });
    let started = rx.recv()?;
    connect()?.signal(SignalTarget::Exec(started.exec_id), libc::SIGTERM)?;
    let status = exec.join().map_err(|_| "exec thread panicked")??;
    check(
        "cancel",
        status == ExitStatus::Signal(libc::SIGTERM),
        status,
    )?;
    Ok(())
}

fn main() {
    match run() {
        Ok(()) => println!("SMOKE done"),
        Err(e) => {
            println!("SMOKE FAILED: {e}");
            std::process::exit(1);
        }
    }
}
