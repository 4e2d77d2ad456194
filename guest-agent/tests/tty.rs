//! Execs on a pseudo-terminal, through the real server and client in this process: the
//! terminal itself, resizes, Ctrl-C as a keystroke, exit codes, and the refusals.

mod common;

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{connect, live_members, raw_connect, server, session_members, ChannelWriter};
use kiln_agent::client::{Client, ClientError, Resizer, TtyIo};
use kiln_agent::protocol::{
    read_frame, write_frame, ExecRequest, ExitStatus, Frame, Started, WindowSize,
};

const WAIT: Duration = Duration::from_secs(20);

/// A tty exec running on its own thread, driven from the test: keystrokes into `keys`,
/// output collected from a channel.
struct Session {
    keys: UnixStream,
    output: mpsc::Receiver<Vec<u8>>,
    seen: String,
    started: Started,
    resizer: Resizer,
    done: thread::JoinHandle<Result<ExitStatus, ClientError>>,
}

impl Session {
    fn start(mut client: Client, req: ExecRequest) -> Session {
        let (keys, input) = UnixStream::pair().unwrap();
        let (out_tx, output) = mpsc::channel();
        let (started_tx, started_rx) = mpsc::channel();
        let done = thread::spawn(move || {
            let mut on_started = |s: Started, r: Resizer| started_tx.send((s, r)).unwrap();
            let io = TtyIo {
                input: input.as_fd(),
                output: &mut ChannelWriter(out_tx),
                on_started: Some(&mut on_started),
            };
            client.exec_tty(&req, io)
        });
        let (started, resizer) = started_rx.recv_timeout(WAIT).expect("the exec started");
        Session {
            keys,
            output,
            seen: String::new(),
            started,
            resizer,
            done,
        }
    }

    /// Waits until the output so far holds `text`.
    fn expect(&mut self, text: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.seen.contains(text) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(bytes) => self.seen.push_str(&String::from_utf8_lossy(&bytes)),
                Err(e) => panic!("waiting for {text:?} ({e}); output so far: {:?}", self.seen),
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.keys.write_all(bytes).unwrap();
    }

    fn finish(self) -> (ExitStatus, String) {
        let status = self.done.join().unwrap().unwrap();
        let mut seen = self.seen;
        for bytes in self.output.try_iter() {
            seen.push_str(&String::from_utf8_lossy(&bytes));
        }
        (status, seen)
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script]).tty(WindowSize { rows: 24, cols: 80 })
}

#[test]
fn the_process_runs_on_a_terminal_of_the_asked_size() {
    let (server, _) = server();
    let (client, _) = connect(&server);
    let req = sh(
        "tty; [ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo all-three; stty size; \
                  echo to-stderr >&2; exit 3",
    );
    let (status, out) = Session::start(client, req).finish();
    assert_eq!(status, ExitStatus::Code(3), "{out:?}");
    // The terminal's line discipline turns "\n" into "\r\n"; stderr shares the terminal.
    assert!(out.starts_with("/dev/pts/"), "{out:?}");
    assert!(
        out.contains("\r\nall-three\r\n24 80\r\nto-stderr\r\n"),
        "{out:?}"
    );
}

#[test]
fn resizes_reach_the_terminal_and_keystrokes_its_line_discipline() {
    let (server, _) = server();
    let (client, _) = connect(&server);
    let req = sh("stty size; read line; echo \"got $line\"; stty size; exit 7");
    let mut s = Session::start(client, req);
    s.expect("24 80\r\n");
    s.resizer
        .resize(WindowSize {
            rows: 50,
            cols: 132,
        })
        .unwrap();
    // The terminal echoes what is typed, and hands the line over at the carriage return.
    s.send(b"hello\r");
    s.expect("hello\r\n");
    let (status, out) = s.finish();
    assert_eq!(status, ExitStatus::Code(7), "{out:?}");
    assert!(out.contains("got hello\r\n50 132\r\n"), "{out:?}");
}

#[test]
fn ctrl_c_interrupts_the_foreground_process() {
    let (server, _) = server();
    let (client, _) = connect(&server);
    let req = sh("trap 'echo interrupted' INT; sleep 100; echo \"sleep=$?\"; exit 5");
    let mut s = Session::start(client, req);
    // Until `sleep` runs (its name is `sleep` once it has replaced the forked shell), a
    // Ctrl-C would reach the shell alone.
    let deadline = Instant::now() + WAIT;
    while !live_members(s.started.pid).iter().any(is_sleep) {
        assert!(Instant::now() < deadline, "sleep never started");
        thread::yield_now();
    }
    let t = Instant::now();
    s.send(b"\x03");
    let (status, out) = s.finish();
    assert!(
        t.elapsed() < Duration::from_secs(50),
        "the sleep ran on: {out:?}"
    );
    assert_eq!(status, ExitStatus::Code(5), "{out:?}");
    assert!(out.contains("^C"), "the terminal echoes Ctrl-C: {out:?}");
    assert!(out.contains("interrupted\r\nsleep=130\r\n"), "{out:?}");
}

/// True if process `pid` runs `sleep` (not a shell forked to run it, still on its way).
fn is_sleep(pid: &i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c == "sleep\n")
}

#[test]
fn a_closed_connection_kills_the_job_in_the_terminal_foreground() {
    let (server, _) = server();
    let (mut stream, handle) = raw_connect(&server);
    // With job control the shell runs `sleep` in a process group of its own, in the
    // terminal's foreground: killing the shell's group alone would leave it.
    let req = ExecRequest::new(["sh", "-m", "-c", "sleep 1000; echo after"])
        .tty(WindowSize { rows: 24, cols: 80 });
    write_frame(&mut stream, &Frame::Exec(req)).unwrap();
    let Some(Frame::Started(started)) = read_frame(&mut stream).unwrap() else {
        panic!("no Started");
    };
    assert!(started.tty);
    let deadline = Instant::now() + WAIT;
    let sleep = loop {
        // Once it is named `sleep`, the forked shell has set its group and exec'd.
        if let Some(pid) = session_members(started.pid).into_iter().find(is_sleep) {
            break pid;
        }
        assert!(Instant::now() < deadline, "sleep never started");
        thread::yield_now();
    };
    assert!(
        !live_members(started.pid).contains(&sleep),
        "sleep runs in a group of its own"
    );
    let (shell, sleep) = (common::PidFd::open(started.pid), common::PidFd::open(sleep));
    drop(stream);
    assert!(handle.join().unwrap().is_ok());
    assert!(shell.wait_exit(WAIT), "the shell outlived its connection");
    assert!(
        sleep.wait_exit(WAIT),
        "the foreground job outlived the connection"
    );
}

#[test]
fn resize_without_a_terminal_is_a_protocol_error() {
    let (server, _) = server();
    let (mut stream, handle) = raw_connect(&server);
    let size = WindowSize { rows: 1, cols: 1 };
    write_frame(&mut stream, &Frame::Resize(size)).unwrap();
    match read_frame(&mut stream).unwrap() {
        Some(Frame::Error(e)) => assert!(e.message.contains("no exec runs"), "{}", e.message),
        other => panic!("{other:?}"),
    }
    assert!(handle.join().unwrap().is_err());

    // After an exec on pipes, too.
    let (mut stream, handle) = raw_connect(&server);
    write_frame(&mut stream, &Frame::Exec(ExecRequest::new(["true"]))).unwrap();
    loop {
        match read_frame(&mut stream).unwrap() {
            Some(Frame::Exit(_)) => break,
            Some(Frame::Started(s)) => assert!(!s.tty),
            other => panic!("{other:?}"),
        }
    }
    write_frame(&mut stream, &Frame::Resize(size)).unwrap();
    match read_frame(&mut stream).unwrap() {
        Some(Frame::Error(e)) => assert!(e.message.contains("has no terminal"), "{}", e.message),
        other => panic!("{other:?}"),
    }
    assert!(handle.join().unwrap().is_err());
}

#[test]
fn an_agent_without_terminals_is_told_apart() {
    // An agent that predates terminals runs the command on pipes and says nothing of it.
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let old_agent = thread::spawn(move || {
        let Some(Frame::Exec(req)) = read_frame(&mut theirs).unwrap() else {
            panic!("no Exec");
        };
        assert!(req.tty.is_some());
        let started = Started {
            exec_id: 1,
            pid: 2,
            tty: false,
        };
        write_frame(&mut theirs, &Frame::Started(started)).unwrap();
        // The client hangs up rather than run it so.
        read_frame(&mut theirs)
    });
    let mut client = Client::from_stream(ours);
    let (_keys, input) = UnixStream::pair().unwrap();
    let io = TtyIo {
        input: input.as_fd(),
        output: &mut Vec::new(),
        on_started: None,
    };
    let err = client.exec_tty(&sh("true"), io).unwrap_err();
    assert!(matches!(err, ClientError::NoTerminal), "{err}");
    assert!(err.to_string().contains("no terminal support"), "{err}");
    assert!(matches!(old_agent.join().unwrap(), Ok(None)));

    // A request without a terminal is refused before anything is sent.
    let (mut client, _) = connect(&server().0);
    let io = TtyIo {
        input: input.as_fd(),
        output: &mut Vec::new(),
        on_started: None,
    };
    let err = client
        .exec_tty(&ExecRequest::new(["true"]), io)
        .unwrap_err();
    assert!(matches!(err, ClientError::Usage(_)), "{err}");
    client.ping().unwrap();
}
