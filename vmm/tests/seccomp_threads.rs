//! seccomp on kiln's helper threads and the restrictions every filter shares: the signal
//! thread may not open files, no thread may make memory executable, and the agent-client
//! filter still lets the restored guest's refresh run to its end. Each case runs in a child
//! process (this test binary again, for one inner test), since a kill takes the process.
//!
//! The threads start through `kiln::seccomp::spawn_filtered`, as kiln's own signal,
//! guest-refresh and job-signal threads do.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use kiln::commands::restore::{refresh_guest, CloneIdentity};
use kiln::seccomp::{spawn_filtered, Filters, ThreadKind};
use kiln_agent::protocol::Frame;

mod util;

/// Set in the child: which case the inner test runs.
const CHILD_ENV: &str = "KILN_SECCOMP_THREADS_CHILD";

/// The child's part.
#[test]
fn child_case() {
    let Ok(case) = std::env::var(CHILD_ENV) else {
        return; // run directly: nothing to do
    };
    let filters = Filters::get().unwrap();
    let dir = util::scratch(&case);
    let done = match case.as_str() {
        "signals-open" => {
            spawn_filtered(Some(&filters), ThreadKind::Signals, "kiln-signals", || {
                let opened = std::fs::File::open("/dev/null").is_ok();
                eprintln!("child: the signal thread opened a file: {opened}");
            })
        }
        "exec" => spawn_filtered(Some(&filters), ThreadKind::Vmm, "kiln-vmm", || {
            // SAFETY: an anonymous private mapping of one page, then mprotect on exactly it.
            unsafe {
                let page = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(page, libc::MAP_FAILED);
                let rc = libc::mprotect(page, 4096, libc::PROT_READ | libc::PROT_EXEC);
                eprintln!("child: mprotect(PROT_EXEC) returned {rc}");
            }
        }),
        "refresh" => {
            let uds = dir.join("vsock.sock");
            // The VMM's vsock socket with the agent behind it, as far as the refresh needs;
            // unfiltered.
            util::agent::serve(&uds, 0, None, |_| Frame::Ok);
            spawn_filtered(
                Some(&filters),
                ThreadKind::AgentClient,
                "kiln-refresh",
                move || {
                    let result =
                        refresh_guest(&uds, Duration::from_secs(10), &CloneIdentity::default());
                    eprintln!("child: refresh: {result:?}");
                },
            )
        }
        other => panic!("unknown case {other}"),
    };
    done.unwrap().join().unwrap();
    // Here, not on the filtered thread: removing files is a path syscall.
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("child: the thread ended");
}

fn run_child(case: &str) -> (std::process::ExitStatus, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_case",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, case)
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_killed(case: &str, syscall: i64, thread: &str) {
    let (status, stderr) = run_child(case);
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "{case}: not killed by SIGSYS: {status:?}\n{stderr}"
    );
    let line =
        format!("kiln: seccomp: syscall {syscall} is outside the filter of thread '{thread}'");
    assert!(stderr.contains(&line), "{case}: no {line:?} in:\n{stderr}");
    assert!(!stderr.contains("child: the thread ended"), "{stderr}");
}

#[test]
fn seccomp_signal_thread_cannot_open_files() {
    assert_killed("signals-open", libc::SYS_openat, "kiln-signals");
}

#[test]
fn seccomp_no_thread_may_make_memory_executable() {
    assert_killed("exec", libc::SYS_mprotect, "kiln-vmm");
}

#[test]
fn seccomp_agent_client_filter_lets_the_guest_refresh_finish() {
    let (status, stderr) = run_child("refresh");
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(stderr.contains("child: refresh: Ok(())"), "{stderr}");
    assert!(stderr.contains("child: the thread ended"), "{stderr}");
}
