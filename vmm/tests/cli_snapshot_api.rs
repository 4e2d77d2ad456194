//! The control API socket's protocol, and `kiln fork`, on the direct path with the
//! spinning tiny guest.

mod util;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;

use serde_json::Value;
use util::vm::*;
use util::*;

fn next_response(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> Value {
    let line = lines.next().expect("a response line").unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
}

#[test]
fn api_answers_line_by_line_on_several_connections() {
    let dir = scratch("protocol");
    let mut vm = RunningVm::start(&dir);
    let first = UnixStream::connect(&vm.api).unwrap();
    let second = UnixStream::connect(&vm.api).unwrap();
    let mut first_lines = BufReader::new(first.try_clone().unwrap()).lines();
    let mut second_lines = BufReader::new(second.try_clone().unwrap()).lines();

    // Several requests in one write, bad ones among them: one answer each, in order.
    (&first)
        .write_all(b"{\"cmd\":\"status\"}\nthis is not json\n{\"cmd\":\"explode\"}\n\n{\"cmd\":\"pause\"}\n")
        .unwrap();
    let status = next_response(&mut first_lines);
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["state"], "running");
    assert_eq!(status["vcpus"], 1);
    let bad = next_response(&mut first_lines);
    assert_eq!(bad["ok"], false, "{bad}");
    assert!(
        bad["error"].as_str().unwrap().contains("bad request"),
        "{bad}"
    );
    let unknown = next_response(&mut first_lines);
    assert_eq!(unknown["ok"], false, "{unknown}");
    assert!(
        unknown["error"].as_str().unwrap().contains("explode"),
        "{unknown}"
    );
    assert_eq!(next_response(&mut first_lines)["state"], "paused");

    // The other connection sees the same VM.
    (&second).write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    assert_eq!(next_response(&mut second_lines)["state"], "paused");
    (&second).write_all(b"{\"cmd\":\"resume\"}\n").unwrap();
    assert_eq!(next_response(&mut second_lines)["state"], "running");
    (&first).write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    assert_eq!(next_response(&mut first_lines)["state"], "running");

    // A line that never ends is cut off with an error, not buffered forever.
    let hog = UnixStream::connect(&vm.api).unwrap();
    let writer = hog.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        let chunk = vec![b'x'; 16 * 1024];
        for _ in 0..16 {
            if (&writer).write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let mut hog_lines = BufReader::new(hog).lines();
    let cut = next_response(&mut hog_lines);
    assert!(
        cut["error"].as_str().unwrap().contains("longer than"),
        "{cut}"
    );
    flood.join().unwrap();

    // Shutdown through the API: kiln run exits 0 and removes the socket.
    (&first).write_all(b"{\"cmd\":\"shutdown\"}\n").unwrap();
    assert_eq!(next_response(&mut first_lines)["state"], "stopping");
    let status = vm.process.wait();
    assert_eq!(status.code(), Some(0));
    assert!(!vm.api.exists(), "the API socket was removed");
    // The connection still open gets an error or its end, never a hang or a bogus answer.
    let _ = (&second).write_all(b"{\"cmd\":\"status\"}\n");
    if let Some(Ok(line)) = second_lines.next() {
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], false, "{v}");
    }
}

#[test]
fn an_existing_api_path_is_refused() {
    let dir = scratch("taken");
    let api = dir.join("api.sock");
    std::fs::write(&api, b"mine").unwrap();
    let kernel = spin_kernel(&dir);
    let line = fails(
        kiln()
            .args(["run", "--memory", "32", "--kernel"])
            .arg(&kernel)
            .arg("--api")
            .arg(&api),
    );
    assert!(line.contains("already exists"), "{line}");
    assert_eq!(std::fs::read(&api).unwrap(), b"mine");
}

#[test]
fn fork_starts_clones_that_answer_and_forwards_sigterm() {
    let base = digest(snapshot());
    let dir = scratch("fork");
    let prefix = dir.join("clone");
    let api_prefix = format!("{}.api", prefix.display());
    let serial_prefix = format!("{}.console", prefix.display());
    let mut fork = Guard::new(
        kiln()
            .args(["fork", "--count", "3", "--snapshot"])
            .arg(snapshot())
            .args(["--api-prefix", &api_prefix])
            .args(["--serial-prefix", &serial_prefix])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(fork.child.stdout.take().unwrap()).lines();
    let mut pids = Vec::new();
    for i in 0..3 {
        let clone = next_response(&mut lines);
        assert_eq!(clone["clone"], i, "{clone}");
        let api = format!("{api_prefix}-{i}");
        assert_eq!(clone["api"], api.as_str(), "{clone}");
        assert_eq!(clone["vsock"], Value::Null, "{clone}");
        assert_eq!(
            clone["serial"],
            format!("{serial_prefix}-{i}").as_str(),
            "{clone}"
        );
        let pid = clone["pid"].as_u64().unwrap();
        pids.push(pid);
        fork.clones.push(i32::try_from(pid).unwrap());
        // Printed once the clone answers: no waiting needed here.
        let status = ctl_ok(std::path::Path::new(&api), &["status"]);
        assert_eq!(status["state"], "running", "{status}");
    }
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 3, "each clone is its own process");
    // Each clone can be driven on its own.
    let api0 = std::path::PathBuf::from(format!("{api_prefix}-0"));
    ctl_ok(&api0, &["pause"]);
    let api1 = std::path::PathBuf::from(format!("{api_prefix}-1"));
    assert_eq!(ctl_ok(&api1, &["status"])["state"], "running");
    assert_eq!(ctl_ok(&api0, &["status"])["state"], "paused");

    signal(&fork.child, libc::SIGTERM);
    let status = fork.wait();
    let mut exits = Vec::new();
    for line in lines {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
        exits.push((
            v["clone"].as_u64().unwrap(),
            v["exit_code"].as_i64().unwrap(),
        ));
    }
    let sigterm = i64::from(128 + libc::SIGTERM);
    assert_eq!(exits, vec![(0, sigterm), (1, sigterm), (2, sigterm)]);
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    for i in 0..3 {
        let api = format!("{api_prefix}-{i}");
        assert!(!std::path::Path::new(&api).exists(), "{api} was removed");
    }
    assert_eq!(digest(snapshot()), base, "the clones changed the snapshot");
}

/// `kiln fork --count 2` of the shared snapshot with `flags`.
fn fork(flags: &[&str]) -> std::process::Output {
    kiln()
        .args(["fork", "--count", "2", "--snapshot"])
        .arg(snapshot())
        .args(flags)
        .output()
        .unwrap()
}

#[test]
fn fork_refuses_taken_paths_before_starting_clones() {
    let dir = scratch("forktaken");
    let api_prefix = format!("{}/api", dir.display());
    std::fs::write(format!("{api_prefix}-1"), b"taken").unwrap();
    let out = fork(&["--api-prefix", &api_prefix]);
    let line = one_error_line("kiln fork", &out);
    assert!(line.contains("api-1 already exists"), "{line}");
    assert!(out.stdout.is_empty(), "no clone was started");
    assert!(!dir.join("api-0").exists());
}

#[test]
fn fork_fails_when_its_clones_fail() {
    // Each clone's console file is in a directory that does not exist: every clone fails.
    let dir = scratch("forkfail");
    let serial_prefix = format!("{}/missing/console", dir.display());
    let out = fork(&["--serial-prefix", &serial_prefix]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("cannot open serial output file"),
        "the clones say why: {stderr}"
    );
    let last = stderr.lines().last().unwrap();
    assert!(
        last.contains("2 of 2 clones failed: clone 0 exited 1, clone 1 exited 1"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let exits: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &Value| v.get("exit_code").is_some())
        .collect();
    assert_eq!(exits.len(), 2, "{stdout}");
}
