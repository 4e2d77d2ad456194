//! `kiln shell` and `kiln exec -t` on this machine's side, against a fake agent behind a
//! hybrid-vsock Unix socket, driven through a pseudo-terminal (`kiln_tests::pty`): raw
//! mode (every key, Ctrl-C too, goes to the guest as a byte), SIGWINCH passed on as the new
//! size, the exit code, the terminal restored; no terminal on stdin is an error.
//! A real guest's terminal is the test-bed test `shell::shell_at_a_terminal_…`.

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_agent::protocol::{read_frame, write_frame, ExitStatus, Frame, Started};
use kiln_tests::pty::{parse, Pty};

mod util;
use util::{agent, scratch};

const WAIT: Duration = Duration::from_secs(30);

/// Serves connections on `uds` as the VMM and an agent would, with a terminal that echoes
/// what is typed as `<typed:…>`, shows a resize as `<size R C>`, and ends with exit code 9
/// at a `q`. A `GetFile` is answered "no such file"; the exec's argv is shown at its start.
fn fake_terminal_agent(uds: &Path) {
    let listener = UnixListener::bind(uds).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let (mut reader, mut w) = agent::handshake(stream.unwrap());
            while let Ok(Some(frame)) = read_frame(&mut reader) {
                let reply = match frame {
                    Frame::Ping => agent::pong(),
                    Frame::GetFile(_) => Frame::error("no such file"),
                    Frame::Exec(req) => {
                        let started = Started {
                            exec_id: 1,
                            pid: 2,
                            tty: req.tty.is_some(),
                        };
                        write_frame(&mut w, &Frame::Started(started)).unwrap();
                        let size = req.tty.map(|s| (s.rows, s.cols));
                        let shown = format!("<argv {:?} size {size:?}>", req.argv);
                        Frame::Stdout(shown.into_bytes())
                    }
                    Frame::Stdin(bytes) if bytes.contains(&b'q') => {
                        Frame::Exit(ExitStatus::Code(9))
                    }
                    Frame::Stdin(bytes) => {
                        let mut shown = b"<typed:".to_vec();
                        shown.extend(bytes);
                        shown.push(b'>');
                        Frame::Stdout(shown)
                    }
                    Frame::Resize(s) => {
                        Frame::Stdout(format!("<size {} {}>", s.rows, s.cols).into_bytes())
                    }
                    Frame::StdinEof => continue,
                    other => panic!("unexpected {other:?}"),
                };
                if write_frame(&mut w, &reply).is_err() {
                    break;
                }
            }
        }
    });
}

fn kiln(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args);
    cmd
}

#[test]
fn shell_keys_go_raw_resizes_follow_and_the_exit_code_is_kilns() {
    let dir = scratch("cli-shell-raw");
    let uds = dir.join("v.sock");
    fake_terminal_agent(&uds);
    let uds = uds.to_str().unwrap();
    // In raw mode Ctrl-C is a byte for the guest, not SIGINT for kiln, and a key goes out
    // at once, without waiting for a newline.
    let conversation = r#"
        expect <argv ["/bin/sh", "-l"] size Some((31, 97))>
        send a
        expect <typed:a>
        send \x03
        expect <typed:\x03>
        resize 40 120
        expect <size 40 120>
        send q
        exit 9
        restored
    "#;
    let mut pty = Pty::spawn(kiln(&["shell", "--vsock", uds]), 31, 97).unwrap();
    pty.converse(&parse(conversation).unwrap(), WAIT).unwrap();

    let conversation = r#"
        expect <argv ["echo", "x"] size Some((24, 80))>
        send q
        exit 9
        restored
    "#;
    let cmd = kiln(&["exec", "-t", "--vsock", uds, "--", "echo", "x"]);
    let mut pty = Pty::spawn(cmd, 24, 80).unwrap();
    pty.converse(&parse(conversation).unwrap(), WAIT).unwrap();
}

#[test]
fn shell_without_a_terminal_is_refused() {
    let dir = scratch("cli-shell-noterm");
    let uds = dir.join("v.sock");
    fake_terminal_agent(&uds);
    let uds = uds.to_str().unwrap();
    for args in [
        vec!["shell", "--vsock", uds],
        vec!["exec", "-t", "--vsock", uds, "--", "true"],
    ] {
        let out = kiln(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("needs a terminal on standard input"),
            "{args:?}: {stderr}"
        );
    }
}
