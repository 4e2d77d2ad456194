//! Exec through the real server and client, over Unix socket pairs in this process.

mod common;

use std::io::{Cursor, Read};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::{connect, fnv, live_members, seq, server, ChannelWriter, PidFd};
use kiln_agent::client::{ClientError, ExecIo};
use kiln_agent::protocol::{ExecRequest, ExitStatus, SignalTarget, Started};

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

#[test]
fn exit_codes_and_signals_are_reported() {
    let (server, _) = server();
    let (mut client, _) = connect(&server);
    for code in [0, 1, 42] {
        let status = client
            .exec(
                &sh(&format!("exit {code}")),
                &mut Vec::new(),
                &mut Vec::new(),
            )
            .unwrap();
        assert_eq!(status, ExitStatus::Code(code));
    }
    let status = client
        .exec(&sh("kill -KILL $$"), &mut Vec::new(), &mut Vec::new())
        .unwrap();
    assert_eq!(status, ExitStatus::Signal(libc::SIGKILL));
    assert_eq!(status.shell_code(), 137);
    // The same connection keeps serving after execs.
    client.ping().unwrap();
}

#[test]
fn output_env_cwd_and_user() {
    let (server, _) = server();
    let (mut client, _) = connect(&server);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let req = sh(r#"echo "$FOO|$(pwd)|$HOME|$PATH"; echo oops >&2"#)
        .env("FOO", "bar baz")
        .env("PATH", "/usr/bin:/bin")
        .cwd("/tmp");
    assert!(client.exec(&req, &mut out, &mut err).unwrap().success());
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "bar baz|/tmp|/root|/usr/bin:/bin\n"
    );
    assert_eq!(err, b"oops\n");

    // SAFETY: geteuid only reads this process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: skipping the uid part");
        return;
    }
    let mut out = Vec::new();
    let req = sh("echo $(id -u):$(id -g):$(id -G)").user(65534, None);
    client.exec(&req, &mut out, &mut Vec::new()).unwrap();
    assert_eq!(out, b"65534:65534:65534\n");
    let mut out = Vec::new();
    let req = sh("echo $(id -u):$(id -g)").user(1234, Some(4321));
    client.exec(&req, &mut out, &mut Vec::new()).unwrap();
    assert_eq!(out, b"1234:4321\n");
}

#[test]
fn start_failures_are_errors_and_the_connection_goes_on() {
    let (server, _) = server();
    let (mut client, _) = connect(&server);
    let cases = [
        (
            ExecRequest::new(["no-such-program-kiln"]),
            "no-such-program-kiln: command not found",
        ),
        (
            ExecRequest::new(["/nonexistent/prog"]),
            "executing /nonexistent/prog: No such file",
        ),
        (
            sh("true").cwd("/nonexistent"),
            "changing to the working directory /nonexistent",
        ),
        (ExecRequest::new(Vec::<String>::new()), "argv is empty"),
    ];
    for (req, expected) in cases {
        match client.exec(&req, &mut Vec::new(), &mut Vec::new()) {
            Err(ClientError::Remote(m)) => assert!(m.contains(expected), "{m}"),
            other => panic!("{req:?}: {other:?}"),
        }
    }
    client.ping().unwrap();
    let status = client
        .exec(&sh("exit 5"), &mut Vec::new(), &mut Vec::new())
        .unwrap();
    assert_eq!(status, ExitStatus::Code(5));
}

#[test]
fn big_interleaved_output_arrives_exactly() {
    let (server, _) = server();
    let (mut client, _) = connect(&server);
    // ~21 MiB on stdout and ~2 MiB on stderr, written at the same time.
    let req = sh("seq 1 2900000 & seq 1 300000 >&2; wait");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = client.exec(&req, &mut out, &mut err).unwrap();
    assert!(status.success());
    let (want_out, want_err) = (seq(2_900_000), seq(300_000));
    assert!(want_out.len() > 20 << 20);
    assert_eq!(
        (out.len(), fnv(&out)),
        (want_out.len(), fnv(&want_out)),
        "stdout differs"
    );
    assert_eq!(
        (err.len(), fnv(&err)),
        (want_err.len(), fnv(&want_err)),
        "stderr differs"
    );
    assert!(out == want_out && err == want_err);
}

#[test]
fn stdin_is_piped() {
    let (server, _) = server();
    let (mut client, _) = connect(&server);
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut input = Cursor::new(data.clone());
    let io = ExecIo {
        stdin: Some(&mut input),
        stdout: &mut out,
        stderr: &mut err,
        on_started: None,
    };
    let status = client
        .exec_with(&ExecRequest::new(["cat"]).stdin_pipe(), io)
        .unwrap();
    assert!(status.success());
    assert!(
        out == data,
        "cat echoed {} of {} bytes",
        out.len(),
        data.len()
    );

    // A process that stops reading early: the rest of stdin is dropped, nothing hangs.
    let mut out = Vec::new();
    let mut endless = std::io::repeat(b'x').take(64 << 20);
    let io = ExecIo {
        stdin: Some(&mut endless),
        stdout: &mut out,
        stderr: &mut Vec::new(),
        on_started: None,
    };
    let status = client
        .exec_with(&sh("head -c 5; echo; exit 3").stdin_pipe(), io)
        .unwrap();
    assert_eq!(
        (status, out.as_slice()),
        (ExitStatus::Code(3), b"xxxxx\n".as_slice())
    );

    // stdin: pipe without a source: an empty stdin.
    let mut out = Vec::new();
    let status = client.exec(
        &ExecRequest::new(["wc", "-c"]).stdin_pipe(),
        &mut out,
        &mut Vec::new(),
    );
    assert!(status.unwrap().success());
    assert_eq!(String::from_utf8(out).unwrap().trim(), "0");

    // A source but a null stdin request: refused before anything is sent.
    let io = ExecIo {
        stdin: Some(&mut Cursor::new(b"x".to_vec())),
        stdout: &mut Vec::new(),
        stderr: &mut Vec::new(),
        on_started: None,
    };
    assert!(matches!(
        client.exec_with(&ExecRequest::new(["cat"]), io),
        Err(ClientError::Usage(_))
    ));
    client.ping().unwrap();
}

#[test]
fn cancel_kills_the_whole_process_group() {
    let (server, _) = server();
    let (mut client, _) = connect(&server);
    let (started_tx, started_rx) = mpsc::channel();
    let (out_tx, out_rx) = mpsc::channel();
    let exec = thread::spawn(move || {
        let mut on_started = |s: Started| started_tx.send(s).unwrap();
        let io = ExecIo {
            stdin: None,
            stdout: &mut ChannelWriter(out_tx),
            stderr: &mut Vec::new(),
            on_started: Some(&mut on_started),
        };
        client.exec_with(&sh("sleep 1000 & echo ready; sleep 1000"), io)
    });
    let started = started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(
        out_rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        b"ready\n"
    );
    assert!(
        live_members(started.pid).len() >= 2,
        "sh and the background sleep run"
    );

    let (mut canceller, _) = connect(&server);
    canceller
        .signal(SignalTarget::Exec(started.exec_id), libc::SIGTERM)
        .unwrap();
    let status = exec.join().unwrap().unwrap();
    assert_eq!(status, ExitStatus::Signal(libc::SIGTERM));
    // `Exit` comes only after every holder of the output pipe has gone: the whole group.
    assert_eq!(live_members(started.pid), Vec::<i32>::new());

    // The exec is gone from the registry; bad targets are refused.
    for (target, signo, expected) in [
        (
            SignalTarget::Exec(started.exec_id),
            libc::SIGTERM,
            "no running exec",
        ),
        (
            SignalTarget::Pid(1),
            libc::SIGTERM,
            "refusing to signal pid 1",
        ),
        (
            SignalTarget::Pid(-1),
            libc::SIGKILL,
            "refusing to signal pid -1",
        ),
        (
            SignalTarget::Pid(started.pid),
            99,
            "99 is not a signal number",
        ),
    ] {
        match canceller.signal(target, signo) {
            Err(ClientError::Remote(m)) => assert!(m.contains(expected), "{m}"),
            other => panic!("{target:?}: {other:?}"),
        }
    }
}

#[test]
fn a_client_that_goes_away_takes_its_exec_with_it() {
    let (server, _) = server();
    let (stream, conn) = common::raw_connect(&server);
    let mut client = kiln_agent::client::Client::from_stream(stream.try_clone().unwrap());
    let (started_tx, started_rx) = mpsc::channel();
    let exec = thread::spawn(move || {
        let mut on_started = |s: Started| started_tx.send(s).unwrap();
        let io = ExecIo {
            stdin: None,
            stdout: &mut Vec::new(),
            stderr: &mut Vec::new(),
            on_started: Some(&mut on_started),
        };
        client.exec_with(&ExecRequest::new(["sleep", "1000"]), io)
    });
    let started = started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let pidfd = PidFd::open(started.pid);
    stream.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(
        pidfd.wait_exit(Duration::from_secs(10)),
        "the exec was not killed"
    );
    assert!(
        conn.join().unwrap().is_ok(),
        "a closed connection is not an error"
    );
    assert!(exec.join().unwrap().is_err());
}

#[test]
fn concurrent_execs_over_separate_connections() {
    let (server, _) = server();
    let handles: Vec<_> = (0..8u32)
        .map(|k| {
            let (mut client, _) = connect(&server);
            thread::spawn(move || {
                // Each also leaves an orphan behind, which the reaper collects without
                // mixing up anyone's status.
                let n = 20_000 + k * 5_000;
                let req = sh(&format!(
                    "sh -c 'true &'; seq 1 {n}; echo k={k} >&2; exit {k}"
                ));
                let (mut out, mut err) = (Vec::new(), Vec::new());
                let status = client.exec(&req, &mut out, &mut err).unwrap();
                assert_eq!(status, ExitStatus::Code(i32::try_from(k).unwrap()));
                assert!(out == seq(n), "exec {k}: wrong stdout");
                assert_eq!(err, format!("k={k}\n").into_bytes());
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}
