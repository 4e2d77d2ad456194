//! Files, system requests, bad frames and the hybrid-vsock handshake.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, SystemTime};

use common::{connect, raw_connect, server, PidFd, TempDir};
use kiln_agent::client::{wait_ready, Client, ClientError};
use kiln_agent::protocol::{
    read_frame, write_frame, ExecRequest, Frame, Kind, HEADER_LEN, MAX_BODY_LEN, VERSION,
};
use kiln_agent::server::ConnectionError;

type Call<'a> = Box<dyn FnOnce(&mut Client) -> Result<(), ClientError> + 'a>;

#[test]
fn files_round_trip() {
    let (server, _) = server();
    let (mut client, _) = connect(&server);
    let dir = TempDir::new();
    let path = dir.path("data.bin");
    let data: Vec<u8> = (0..(3u32 << 20) + 17)
        .map(|i| (i * 7).to_le_bytes()[0])
        .collect();
    let sent = client.put_file(&path, 0o750, &mut data.as_slice()).unwrap();
    assert_eq!(sent, data.len() as u64);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
    assert!(std::fs::read(&path).unwrap() == data);

    let mut back = Vec::new();
    let info = client.get_file(&path, &mut back).unwrap();
    assert_eq!((info.size, info.mode), (data.len() as u64, 0o750));
    assert!(back == data);

    // Replacing a file, and an empty one.
    client.put_file(&path, 0o600, &mut &b""[..]).unwrap();
    let mut back = vec![1];
    let info = client.get_file(&path, &mut back).unwrap();
    assert_eq!((info.size, info.mode, back.len()), (0, 0o600, 1));

    let missing = dir.path("missing/file");
    let cases: [(Call, &str); 5] = [
        (
            Box::new(|c| c.get_file(&missing, &mut Vec::new()).map(drop)),
            "No such file",
        ),
        (
            Box::new(|c| c.put_file(&missing, 0o644, &mut &b"abc"[..]).map(drop)),
            "No such file",
        ),
        (
            Box::new(|c| c.get_file("relative", &mut Vec::new()).map(drop)),
            "must be absolute",
        ),
        (
            Box::new(|c| c.put_file("rel", 0o644, &mut &b"x"[..]).map(drop)),
            "must be absolute",
        ),
        (
            Box::new(|c| c.get_file("/tmp", &mut Vec::new()).map(drop)),
            "not a regular file",
        ),
    ];
    for (call, expected) in cases {
        match call(&mut client) {
            Err(ClientError::Remote(m)) => assert!(m.contains(expected), "{m}"),
            other => panic!("{other:?}"),
        }
    }
    client.ping().unwrap();
    // No temporary files left behind.
    let names: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names, ["data.bin"]);
}

#[test]
fn ping_and_system_requests() {
    let (server, system) = server();
    let (mut client, conn) = connect(&server);
    let pong = client.ping().unwrap();
    assert_eq!(pong.version, VERSION);
    assert_eq!(pong.agent, env!("CARGO_PKG_VERSION"));
    assert!(pong.uptime_ms > 0);
    let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
    client.set_time(t).unwrap();
    client.add_entropy(&[7; 64]).unwrap();
    client.shutdown().unwrap();
    assert!(matches!(client.ping(), Err(ClientError::Broken)));
    // The agent acts after it answers: wait for the connection to end before looking.
    drop(client);
    conn.join().unwrap().unwrap();
    assert_eq!(
        *system.0.lock().unwrap(),
        ["time 1700000000123456789", "entropy 64", "shutdown"]
    );
}

/// Sends `bytes` on a fresh connection; expects the agent to answer `Error` mentioning
/// `expected`, close the connection, and go on serving others.
fn rejects(bytes: &[u8], expected: &str) {
    let (server, _) = server();
    let (mut stream, conn) = raw_connect(&server);
    stream.write_all(bytes).unwrap();
    let answer = read_frame(&mut stream).unwrap();
    match answer {
        Some(Frame::Error(e)) => assert!(e.message.contains(expected), "{}", e.message),
        other => panic!("{other:?}"),
    }
    let err = conn.join().unwrap().unwrap_err();
    assert!(err.to_string().contains(expected), "{err}");
    drop(stream);
    let (mut other, _) = connect(&server);
    other.ping().unwrap();
}

#[test]
fn bad_frames_close_only_their_connection() {
    rejects(b"GET / HTTP/1.1\r\n\r\n", "unsupported protocol version");
    let mut header = u32::try_from(MAX_BODY_LEN + 1)
        .unwrap()
        .to_le_bytes()
        .to_vec();
    header.extend([VERSION, Kind::Data as u8]);
    rejects(&header, "over the limit");
    rejects(&[0, 0, 0, 0, VERSION, 0xee], "unknown frame kind 0xee");
    let mut bad_json = 3u32.to_le_bytes().to_vec();
    bad_json.extend([VERSION, Kind::Exec as u8]);
    bad_json.extend(b"{x}");
    rejects(&bad_json, "malformed Exec frame");
    let mut frame = Vec::new();
    write_frame(&mut frame, &Frame::Stdout(b"hi".to_vec())).unwrap();
    rejects(&frame, "Stdout frame from the client; it is not a request");
    let mut frame = Vec::new();
    write_frame(&mut frame, &Frame::Stdin(b"hi".to_vec())).unwrap();
    rejects(&frame, "no exec is taking stdin");
    let mut frame = Vec::new();
    write_frame(&mut frame, &Frame::Data(b"hi".to_vec())).unwrap();
    rejects(&frame, "Data frame from the client");
    // A truncated frame, then the client closes.
    let (server, _) = server();
    let (mut stream, conn) = raw_connect(&server);
    stream.write_all(&[10, 0, 0, 0, VERSION]).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let err = conn.join().unwrap().unwrap_err();
    assert!(matches!(err, ConnectionError::Protocol(_)), "{err}");
    assert!(
        err.to_string().contains("5 of the 6 bytes of its header"),
        "{err}"
    );
    assert_eq!(HEADER_LEN, 6);
}

#[test]
fn a_request_during_an_exec_closes_the_connection_and_kills_the_exec() {
    let (server, _) = server();
    let (mut stream, conn) = raw_connect(&server);
    write_frame(
        &mut stream,
        &Frame::Exec(ExecRequest::new(["sleep", "1000"])),
    )
    .unwrap();
    let Some(Frame::Started(started)) = read_frame(&mut stream).unwrap() else {
        panic!("no Started");
    };
    let pidfd = PidFd::open(started.pid);
    write_frame(&mut stream, &Frame::Ping).unwrap();
    // The exec's own ending (Exit, killed) and the Error may come in either order.
    let mut seen = Vec::new();
    while let Some(frame) = read_frame(&mut stream).unwrap() {
        seen.push(frame);
    }
    assert!(
        seen.iter()
            .any(|f| matches!(f, Frame::Error(e) if e.message.contains("Ping request while exec"))),
        "{seen:?}"
    );
    assert!(pidfd.wait_exit(Duration::from_secs(10)));
    assert!(conn.join().unwrap().is_err());
}

/// A stand-in for the VMM's hybrid-vsock socket: answers `CONNECT 1024` after refusing the
/// first `refuse` connections (as a VMM does while the guest is not listening yet), then
/// splices to the server.
fn fake_vmm(dir: &TempDir, refuse: usize, connections: usize) -> String {
    let (server, _) = server();
    let path = dir.path("vm.vsock");
    let listener = UnixListener::bind(&path).unwrap();
    thread::spawn(move || {
        for (i, stream) in listener.incoming().take(connections).enumerate() {
            let mut stream: UnixStream = stream.unwrap();
            let mut line = Vec::new();
            let mut b = [0u8];
            while line.last() != Some(&b'\n') && stream.read(&mut b).unwrap() == 1 {
                line.push(b[0]);
            }
            if i < refuse {
                continue; // closes the connection without an answer
            }
            if line != b"CONNECT 1024\n" {
                stream.write_all(b"ERR no such port\n").unwrap();
                continue;
            }
            stream.write_all(b"OK 1073741824\n").unwrap();
            server.spawn_connection(stream.try_clone().unwrap(), stream);
        }
    });
    path
}

#[test]
fn hybrid_vsock_handshake() {
    let dir = TempDir::new();
    let uds = fake_vmm(&dir, 1, 3);
    match Client::connect_unix(&uds, 1024) {
        Err(ClientError::Refused { answer, .. }) => assert_eq!(answer, ""),
        other => panic!("{:?}", other.map(|_| ())),
    }
    let err = Client::connect_unix(&uds, 52).err().unwrap();
    assert!(
        err.to_string()
            .contains(r#"answered "ERR no such port\n" to CONNECT 52"#),
        "{err}"
    );
    let mut client = Client::connect_unix(&uds, 1024).unwrap();
    client.ping().unwrap();
    let mut out = Vec::new();
    let status = client.exec(
        &ExecRequest::new(["echo", "via uds"]),
        &mut out,
        &mut Vec::new(),
    );
    assert!(status.unwrap().success());
    assert_eq!(out, b"via uds\n");

    let err = Client::connect_unix(dir.path("nothing-here"), 1024)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .starts_with("connecting to the VM's vsock socket"),
        "{err}"
    );
}

#[test]
fn wait_ready_retries_until_the_agent_answers() {
    let dir = TempDir::new();
    // The socket appears only after a while, and refuses a few times before it answers.
    let (tx, rx) = mpsc::channel();
    let dir_path = dir.path("late");
    std::fs::create_dir(&dir_path).unwrap();
    let waiter = {
        let uds = format!("{dir_path}/vm.vsock");
        thread::spawn(move || {
            tx.send(()).unwrap();
            wait_ready(uds, 1024, Duration::from_secs(30))
        })
    };
    rx.recv().unwrap();
    let late = TempDir(dir_path.into());
    fake_vmm(&late, 3, 4);
    let pong = waiter.join().unwrap().unwrap();
    assert_eq!(pong.version, VERSION);
    std::mem::forget(late); // `dir` removes it

    let err = wait_ready(dir.path("never"), 1024, Duration::from_millis(50)).unwrap_err();
    assert!(matches!(err, ClientError::NotReady { .. }), "{err}");
    assert!(
        err.to_string().contains("did not answer within 50ms"),
        "{err}"
    );
}
