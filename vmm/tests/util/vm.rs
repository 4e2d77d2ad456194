//! A spinning tiny guest under `kiln run --api`, `kiln ctl` against it, and a snapshot of
//! it made through the CLI once per test process.

use std::collections::BTreeMap;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{kiln, next_line, scratch, signal, spin_kernel_saying};

pub const MESSAGE: &str = "spinning now\n";

/// A tiny ELF guest in `dir` that prints [`MESSAGE`], marks boot done and spins.
pub fn spin_kernel(dir: &Path) -> PathBuf {
    spin_kernel_saying(dir, MESSAGE)
}

/// A kiln process, and the clones it started, killed if still running when dropped: a
/// failing test leaves no spinning VM behind.
pub struct Guard {
    pub child: Child,
    pub clones: Vec<i32>,
}

impl Guard {
    pub fn new(child: Child) -> Guard {
        Guard {
            child,
            clones: Vec::new(),
        }
    }

    /// Waits for the process to exit; after 30 s it is killed and the test fails.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "kiln (pid {}) did not exit within 30 s",
                self.child.id()
            );
            // Polling interval while waiting for the exit itself, not a synchronization.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// [`Guard::wait`], then what the process wrote to its piped stdout and stderr (both
    /// small here: reading them after the exit cannot block it).
    pub fn finish(&mut self) -> (ExitStatus, String, String) {
        use std::io::Read;
        let status = self.wait();
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            out.read_to_string(&mut stdout).unwrap();
        }
        if let Some(mut err) = self.child.stderr.take() {
            err.read_to_string(&mut stderr).unwrap();
        }
        (status, stdout, stderr)
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        signal(&self.child, libc::SIGTERM);
        self.wait()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for pid in &self.clones {
            // SAFETY: kill() only sends a signal (the clone may be gone already).
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
    }
}

/// A `kiln run --api` of the spinning guest; killed when dropped if still running.
pub struct RunningVm {
    pub process: Guard,
    pub api: PathBuf,
}

impl RunningVm {
    /// Boots the spinning guest with its API at `dir/api.sock` and returns once the guest
    /// has printed (the API socket is bound before the VM runs).
    pub fn start(dir: &Path) -> RunningVm {
        Self::start_with(dir, &[])
    }

    /// [`RunningVm::start`] with more `kiln run` flags.
    pub fn start_with(dir: &Path, flags: &[&str]) -> RunningVm {
        let kernel = spin_kernel(dir);
        let api = dir.join("api.sock");
        let mut child = kiln()
            .args(["run", "--memory", "32", "--json", "--kernel"])
            .arg(&kernel)
            .arg("--api")
            .arg(&api)
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let line = next_line(&mut stdout);
        if line != MESSAGE {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the guest did not start: {line:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Keep draining stdout so that the report at the end cannot block kiln.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        RunningVm {
            process: Guard::new(child),
            api,
        }
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        self.process.terminate()
    }
}

/// `kiln ctl --api API ARGS`.
pub fn ctl(api: &Path, args: &[&str]) -> Output {
    kiln()
        .arg("ctl")
        .arg("--api")
        .arg(api)
        .args(args)
        .output()
        .unwrap()
}

/// `kiln ctl ARGS` that must succeed; returns its JSON response.
pub fn ctl_ok(api: &Path, args: &[&str]) -> serde_json::Value {
    let out = ctl(api, args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kiln ctl {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    v
}

/// Polls `kiln ctl status` until it answers (true), `child` exits or 30 s pass (false).
pub fn wait_answering(api: &Path, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if api.exists() && ctl(api, &["--timeout", "5", "status"]).status.success() {
            return true;
        }
        if !matches!(child.try_wait(), Ok(None)) {
            return false;
        }
        // Polling interval between attempts of a real condition, not a synchronization.
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A snapshot of the spinning guest made through the CLI, once per test process:
/// `kiln run --api`, `kiln ctl snapshot`, `kiln ctl shutdown` (kiln run then exits 0).
pub fn snapshot() -> &'static Path {
    static SNAPSHOT: OnceLock<PathBuf> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let dir = scratch("base");
        let mut vm = RunningVm::start(&dir);
        let snap = dir.join("snap");
        let answer = ctl_ok(&vm.api, &["snapshot", "--dir", snap.to_str().unwrap()]);
        assert_eq!(answer["state"], "running", "{answer}");
        assert!(answer["memory_bytes_written"].as_u64().unwrap() > 0);
        ctl_ok(&vm.api, &["shutdown"]);
        let status = vm.process.wait();
        assert_eq!(status.code(), Some(0), "kiln run after a shutdown request");
        assert!(!vm.api.exists(), "the API socket was removed");
        snap
    })
}

/// A copy of the shared snapshot to damage.
pub fn snapshot_copy(name: &str) -> PathBuf {
    let dir = scratch(name).join("snap");
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["state", "memory"] {
        std::fs::copy(snapshot().join(file), dir.join(file)).unwrap();
    }
    dir
}

/// Every file of `dir` by name, with its bytes (the files are a few MiB at most; hashing
/// them in a debug build would cost more than comparing them).
pub fn digest(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect()
}
