//! The structured (JSON) bodies of frames.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Run a process in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The program and its arguments. A program without a `/` is looked up in `PATH` (the
    /// one in `env` if given, else the agent's default).
    pub argv: Vec<String>,
    /// Variables set on top of the agent's default environment (`PATH`, `HOME`).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The working directory; `/` if not given.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Where standard input comes from.
    #[serde(default)]
    pub stdin: StdinMode,
    /// Run as this user id (the agent runs as root); root if not given.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Run with this group id; the uid's value if not given. Supplementary groups are
    /// dropped when `uid` or `gid` is set.
    #[serde(default)]
    pub gid: Option<u32>,
    /// Run on a new pseudo-terminal of this initial size: the process leads a session whose
    /// controlling terminal is the PTY's slave, which is its stdin, stdout and stderr. Its
    /// output comes as `Stdout` frames only (the PTY merges the two streams), `Stdin` frames
    /// are typed into the PTY (set `stdin: pipe`), and `Resize` frames change its size.
    #[serde(default)]
    pub tty: Option<WindowSize>,
}

impl ExecRequest {
    /// A request to run `argv` with the default environment, in `/`, without stdin.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            stdin: StdinMode::Null,
            uid: None,
            gid: None,
            tty: None,
        }
    }

    /// Adds the variable `key=value`.
    #[must_use]
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the working directory.
    #[must_use]
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Gives the process a pipe as standard input, fed by `Stdin` frames.
    #[must_use]
    pub fn stdin_pipe(mut self) -> Self {
        self.stdin = StdinMode::Pipe;
        self
    }

    /// Runs the process on a pseudo-terminal of `size` (and takes `Stdin` frames for it).
    #[must_use]
    pub fn tty(mut self, size: WindowSize) -> Self {
        self.tty = Some(size);
        self.stdin = StdinMode::Pipe;
        self
    }

    /// Runs the process as `uid` (and `gid`, if given).
    #[must_use]
    pub fn user(mut self, uid: u32, gid: Option<u32>) -> Self {
        self.uid = Some(uid);
        self.gid = gid;
        self
    }
}

/// Where an exec's standard input comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StdinMode {
    /// `/dev/null`.
    #[default]
    Null,
    /// A pipe fed by the client's `Stdin` frames until `StdinEof`.
    Pipe,
}

/// The size of a terminal, in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// An exec has started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// The agent's id for the exec: the target of [`SignalTarget::Exec`].
    pub exec_id: u64,
    /// The guest pid of the process, which leads its own session and process group.
    pub pid: i32,
    /// The process runs on a pseudo-terminal (the request asked for `tty`). An agent that
    /// predates terminals leaves it out, so a client that asked for one can tell.
    #[serde(default)]
    pub tty: bool,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// Decodes a `waitpid` status.
    pub fn from_wait_status(status: i32) -> Self {
        if libc::WIFSIGNALED(status) {
            ExitStatus::Signal(libc::WTERMSIG(status))
        } else {
            ExitStatus::Code(libc::WEXITSTATUS(status))
        }
    }

    /// True if the process exited with code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    /// The status as a shell reports it: the code, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exited with {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// Send a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalRequest {
    /// Who gets it.
    pub target: SignalTarget,
    /// The signal number (`libc::SIGTERM`, …); 0 only checks that the target exists.
    pub signo: i32,
}

/// The target of a [`SignalRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignalTarget {
    /// Every process in the process group of a running exec.
    Exec(u64),
    /// One process.
    Pid(i32),
}

/// Write a file; its contents follow as `Data` frames and `DataEnd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutFile {
    /// Absolute path in the guest; its directory must exist. The file is replaced whole.
    pub path: String,
    /// Permission bits (e.g. `0o755`).
    pub mode: u32,
}

/// Read a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetFile {
    /// Absolute path in the guest.
    pub path: String,
}

/// What a `GetFile` sends before the contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Size in bytes when the agent opened it.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
}

/// The answer to `Ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The protocol version the agent speaks.
    pub version: u8,
    /// The agent's package version.
    pub agent: String,
    /// Time since the guest booted (CLOCK_BOOTTIME), in milliseconds.
    pub uptime_ms: u64,
}

/// Set the guest's wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetTime {
    /// Nanoseconds since the Unix epoch.
    pub unix_nanos: u64,
}

/// A failure, in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// What went wrong.
    pub message: String,
}
