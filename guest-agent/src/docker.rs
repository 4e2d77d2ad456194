//! Docker in the guest: the agent starts `dockerd` when a job asks for it.
//!
//! The host runs the agent's own binary as `/proc/1/exe docker-start` through an ordinary
//! exec (as it runs `net-refresh` after a restore), so images need nothing but Docker
//! itself and the protocol needs no message of its own. The helper:
//!
//! 1. finds `dockerd` on [`SEARCH_PATH`]; without one it fails with one line naming the
//!    fix (or, with `--if-installed`, reports [`Report::Absent`] and succeeds);
//! 2. does nothing more if [`SOCKET`] already answers (a VM restored from a snapshot taken
//!    with Docker running, or a second request);
//! 3. starts `containerd`, when the image has it, and waits until its socket accepts
//!    connections ([`CONTAINERD_SOCKET`]): `dockerd` gives a `containerd` it starts itself
//!    only a short, fixed time, too short on a slow machine;
//! 4. starts `dockerd` (pointed at that `containerd`); both run in a cgroup of their own
//!    ([`CGROUP`]: the daemons and their containers are not counted against the job's
//!    cgroup, and a job that limits its own cgroup does not limit Docker), in process
//!    groups of their own (cancelling the exec that started them does not kill them),
//!    output appended to [`LOG`];
//! 5. waits until `GET /_ping` on [`SOCKET`] answers `200`, failing early if `dockerd`
//!    exits, and at the timeout with the end of its log;
//! 6. prints one [`Report`] line on stdout: how long Docker took from the first daemon's
//!    start to its first answer.
//!
//! When the helper exits, the daemons are re-parented to PID 1, whose reaper collects them.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What the host runs in the guest (the agent is `/proc/1/exe` from any process).
pub const AGENT_EXE: &str = "/proc/1/exe";
/// The helper's subcommand.
pub const SUBCOMMAND: &str = "docker-start";
/// Docker's API socket, where `docker` looks by default.
pub const SOCKET: &str = "/var/run/docker.sock";
/// containerd's API socket, where the helper's `containerd` listens and `dockerd` looks.
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// Where `dockerd`'s (and `containerd`'s) output goes.
pub const LOG: &str = "/var/log/kiln-dockerd.log";
/// The cgroup `dockerd` runs in, beside the job's.
pub const CGROUP: &str = "/sys/fs/cgroup/dockerd";
/// Where the helper looks for `dockerd` (Debian's `docker.io` and Docker's own packages
/// install it in `/usr/sbin` and `/usr/bin`).
pub const SEARCH_PATH: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];
/// How long the helper waits for `dockerd` unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// The helper's exit code when the image has no `dockerd` and one was required.
pub const EXIT_NOT_INSTALLED: i32 = 3;
/// How often the helper asks the socket while `dockerd` starts.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long one `/_ping` may take.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of the log an error quotes.
const LOG_TAIL: usize = 600;

/// Why Docker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The image has no `dockerd`.
    #[error(
        "this image has no dockerd (looked in {}); build one with Docker, e.g. `kiln image \
         build --packages docker.io,…`",
        SEARCH_PATH.join(", ")
    )]
    NotInstalled,
    /// `dockerd` could not be started.
    #[error("cannot start {path}: {source}")]
    Spawn {
        /// The `dockerd` found.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Setting up what `dockerd` runs in failed.
    #[error("cannot prepare {path} for dockerd: {source}")]
    Prepare {
        /// The file or directory.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// `dockerd` (or the `containerd` started for it) ended before it answered.
    #[error("{what} exited ({status}) before it answered; the end of {LOG}: {tail}")]
    Exited {
        /// `dockerd` or `containerd`.
        what: &'static str,
        /// How it ended.
        status: std::process::ExitStatus,
        /// The end of its log.
        tail: String,
    },
    /// `dockerd` (or `containerd`) did not answer in time.
    #[error("{what} did not answer within {secs} s; the end of {LOG}: {tail}")]
    Timeout {
        /// `dockerd` or `containerd`.
        what: &'static str,
        /// The timeout.
        secs: u64,
        /// The end of its log.
        tail: String,
    },
}

/// What the helper prints on stdout when it succeeds: one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// `--if-installed` and the image has no `dockerd`: nothing was started.
    Absent,
    /// `dockerd` answers; it took `ms` milliseconds from its start (0: it was already
    /// running, `already`).
    Ready {
        /// Start-to-ready time of this start.
        ms: u64,
        /// It was running before the helper came.
        already: bool,
    },
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Report::Absent => write!(f, "dockerd=absent"),
            Report::Ready { ms, already: false } => write!(f, "dockerd=ready ready_ms={ms}"),
            Report::Ready { already: true, .. } => write!(f, "dockerd=running"),
        }
    }
}

impl Report {
    /// Reads the report line out of the helper's stdout.
    pub fn parse(stdout: &str) -> Option<Report> {
        stdout.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            match words.next()? {
                "dockerd=absent" => Some(Report::Absent),
                "dockerd=running" => Some(Report::Ready {
                    ms: 0,
                    already: true,
                }),
                "dockerd=ready" => {
                    let ms = words.next()?.strip_prefix("ready_ms=")?.parse().ok()?;
                    Some(Report::Ready { ms, already: false })
                }
                _ => None,
            }
        })
    }
}

/// The argv the host execs in the guest: start `dockerd` (and require it unless
/// `if_installed`), waiting at most `timeout`.
pub fn helper_argv(if_installed: bool, timeout: Duration) -> Vec<String> {
    let mut argv = vec![
        AGENT_EXE.to_string(),
        SUBCOMMAND.to_string(),
        "--timeout".to_string(),
        timeout.as_secs().max(1).to_string(),
    ];
    if if_installed {
        argv.push("--if-installed".to_string());
    }
    argv
}

/// Why the host's request for Docker failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The agent could not run the helper.
    #[error("cannot run {SUBCOMMAND} in the guest: {0}")]
    Agent(#[from] crate::client::ClientError),
    /// The image has no `dockerd` and the job asked for Docker.
    #[error("{0}")]
    NotInstalled(String),
    /// `dockerd` did not come up; the helper's words.
    #[error("{0}")]
    Failed(String),
}

/// Runs the helper in the guest through `client` (the host side): starts `dockerd` (required
/// unless `if_installed`) and returns its report.
pub fn request(
    client: &mut crate::client::Client,
    if_installed: bool,
    timeout: Duration,
) -> Result<Report, RequestError> {
    let req = crate::protocol::ExecRequest::new(helper_argv(if_installed, timeout));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = client.exec(&req, &mut out, &mut err)?;
    let words = helper_words(&err);
    match status {
        crate::protocol::ExitStatus::Code(EXIT_NOT_INSTALLED) => {
            Err(RequestError::NotInstalled(words))
        }
        s if s.success() => Report::parse(&String::from_utf8_lossy(&out)).ok_or_else(|| {
            RequestError::Failed(format!(
                "{SUBCOMMAND} printed no report (stdout {:?}); an agent without it?",
                String::from_utf8_lossy(&out).trim()
            ))
        }),
        s => Err(RequestError::Failed(if words.is_empty() {
            format!("{SUBCOMMAND} {s}")
        } else {
            words
        })),
    }
}

/// The helper's error line, without the agent's `kiln-agent: docker: ` prefix.
fn helper_words(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    line.trim()
        .trim_start_matches("kiln-agent: ")
        .trim_start_matches("docker: ")
        .to_string()
}

/// The helper's options, from its arguments (after the subcommand).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Succeed with [`Report::Absent`] when the image has no `dockerd`.
    pub if_installed: bool,
    /// How long to wait for `dockerd` to answer.
    pub timeout: Duration,
}

impl Options {
    /// Parses `--if-installed` and `--timeout SECS`.
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Options, String> {
        let mut opts = Options {
            if_installed: false,
            timeout: DEFAULT_TIMEOUT,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--if-installed" => opts.if_installed = true,
                "--timeout" => {
                    let secs = args
                        .next()
                        .and_then(|s| s.parse::<u64>().ok())
                        .filter(|&s| s > 0)
                        .ok_or("--timeout takes a number of seconds")?;
                    opts.timeout = Duration::from_secs(secs);
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(opts)
    }
}

/// The first `dockerd` on [`SEARCH_PATH`] under `root` (`/` in the guest).
pub fn find_dockerd(root: &Path) -> Option<PathBuf> {
    find_in(root, "dockerd")
}

/// The first file `name` on [`SEARCH_PATH`] under `root`.
fn find_in(root: &Path, name: &str) -> Option<PathBuf> {
    SEARCH_PATH
        .iter()
        .map(|dir| root.join(dir.trim_start_matches('/')).join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file()))
}

/// Starts `dockerd` as the options say and waits until it answers (see the module docs).
pub fn start(opts: &Options) -> Result<Report, DockerError> {
    let Some(dockerd) = find_dockerd(Path::new("/")) else {
        return if opts.if_installed {
            Ok(Report::Absent)
        } else {
            Err(DockerError::NotInstalled)
        };
    };
    if ping(Path::new(SOCKET)).unwrap_or(false) {
        return Ok(Report::Ready {
            ms: 0,
            already: true,
        });
    }
    enter_own_cgroup()?;
    let started = Instant::now();
    let deadline = started + opts.timeout;
    let mut dockerd_cmd = Command::new(&dockerd);
    // containerd first, waited for here: dockerd gives a containerd it starts itself only a
    // short, fixed time to come up, which a slow machine (the nested test bed) exceeds.
    if let Some(containerd) = find_in(Path::new("/"), "containerd") {
        if UnixStream::connect(CONTAINERD_SOCKET).is_err() {
            let mut child = spawn_daemon(&mut Command::new(&containerd))?;
            wait_until(&mut child, deadline, opts.timeout, "containerd", || {
                UnixStream::connect(CONTAINERD_SOCKET).is_ok()
            })?;
        }
        dockerd_cmd.arg("--containerd").arg(CONTAINERD_SOCKET);
    }
    let mut child = spawn_daemon(&mut dockerd_cmd)?;
    wait_until(&mut child, deadline, opts.timeout, "dockerd", || {
        ping(Path::new(SOCKET)).unwrap_or(false)
    })?;
    Ok(Report::Ready {
        ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        already: false,
    })
}

/// Starts a daemon with its output appended to [`LOG`], in a process group of its own: a
/// cancel of the exec that started it (SIGKILL to that exec's group) must not take the
/// daemon with it.
fn spawn_daemon(cmd: &mut Command) -> Result<std::process::Child, DockerError> {
    let log = open_log()?;
    let log_err = log.try_clone().map_err(|source| DockerError::Prepare {
        path: LOG.into(),
        source,
    })?;
    cmd.stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .spawn()
        .map_err(|source| DockerError::Spawn {
            path: PathBuf::from(cmd.get_program()),
            source,
        })
}

/// Polls `ready` until it holds, failing if `child` (called `what`) exits first or the
/// deadline passes.
fn wait_until(
    child: &mut std::process::Child,
    deadline: Instant,
    timeout: Duration,
    what: &'static str,
    mut ready: impl FnMut() -> bool,
) -> Result<(), DockerError> {
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(DockerError::Exited {
                what,
                status,
                tail: log_tail(),
            });
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(DockerError::Timeout {
                what,
                secs: timeout.as_secs(),
                tail: log_tail(),
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Moves this process (and so the `dockerd` it forks) into [`CGROUP`], when the guest has
/// cgroup v2 mounted; elsewhere `dockerd` starts where the helper is.
fn enter_own_cgroup() -> Result<(), DockerError> {
    let root = Path::new(CGROUP).parent().unwrap_or(Path::new("/"));
    if !root.join("cgroup.controllers").exists() {
        return Ok(());
    }
    let prepare = |source| DockerError::Prepare {
        path: CGROUP.into(),
        source,
    };
    match fs::create_dir(CGROUP) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(prepare(e)),
        _ => {}
    }
    // "0" moves the writing process.
    fs::write(Path::new(CGROUP).join("cgroup.procs"), "0").map_err(prepare)
}

fn open_log() -> Result<fs::File, DockerError> {
    let prepare = |source| DockerError::Prepare {
        path: LOG.into(),
        source,
    };
    if let Some(dir) = Path::new(LOG).parent() {
        fs::create_dir_all(dir).map_err(prepare)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(LOG)
        .map_err(prepare)
}

/// The last [`LOG_TAIL`] bytes of the log, on one line.
fn log_tail() -> String {
    let text = fs::read(LOG).unwrap_or_default();
    let start = text.len().saturating_sub(LOG_TAIL);
    let tail = String::from_utf8_lossy(&text[start..]);
    let joined = tail.split_whitespace().collect::<Vec<_>>().join(" ");
    if joined.is_empty() {
        "(empty)".into()
    } else {
        joined
    }
}

/// Whether Docker's API at `socket` answers `GET /_ping` with 200.
pub fn ping(socket: &Path) -> io::Result<bool> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(PING_TIMEOUT))?;
    stream.set_write_timeout(Some(PING_TIMEOUT))?;
    stream.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")?;
    let mut answer = Vec::new();
    stream.take(4096).read_to_end(&mut answer)?;
    Ok(is_ok_response(&answer))
}

/// Whether `answer` is an HTTP response with status 200.
pub fn is_ok_response(answer: &[u8]) -> bool {
    let text = String::from_utf8_lossy(answer);
    let mut status_line = text.lines().next().unwrap_or("").split_whitespace();
    status_line.next().is_some_and(|v| v.starts_with("HTTP/1."))
        && status_line.next() == Some("200")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn reports_round_trip_through_their_line() {
        for r in [
            Report::Absent,
            Report::Ready {
                ms: 1234,
                already: false,
            },
            Report::Ready {
                ms: 0,
                already: true,
            },
        ] {
            let out = format!("noise\n{r}\n");
            assert_eq!(Report::parse(&out), Some(r), "{out}");
        }
        assert_eq!(Report::parse("dockerd=ready ready_ms=x\n"), None);
        assert_eq!(Report::parse(""), None);
    }

    #[test]
    fn the_helper_line_loses_the_agent_prefix() {
        let err = format!("kiln-agent: docker: {}\n", DockerError::NotInstalled);
        let words = helper_words(err.as_bytes());
        assert!(words.starts_with("this image has no dockerd"), "{words}");
        assert_eq!(helper_words(b""), "");
    }

    #[test]
    fn options_parse_and_refuse_what_they_do_not_know() {
        let argv = helper_argv(true, Duration::from_secs(30));
        assert_eq!(argv[..2], [AGENT_EXE, SUBCOMMAND]);
        let opts = Options::parse(argv.into_iter().skip(2)).unwrap();
        assert_eq!(
            opts,
            Options {
                if_installed: true,
                timeout: Duration::from_secs(30)
            }
        );
        let opts = Options::parse(Vec::new()).unwrap();
        assert!(!opts.if_installed);
        assert_eq!(opts.timeout, DEFAULT_TIMEOUT);
        assert!(Options::parse(["--timeout".to_string()]).is_err());
        assert!(Options::parse(["--timeout".to_string(), "0".to_string()]).is_err());
        assert!(Options::parse(["--now".to_string()]).is_err());
    }

    #[test]
    fn only_a_200_status_line_is_ready() {
        assert!(is_ok_response(
            b"HTTP/1.0 200 OK\r\nApi-Version: 1.41\r\n\r\nOK"
        ));
        assert!(is_ok_response(b"HTTP/1.1 200 OK\r\n\r\nOK"));
        assert!(!is_ok_response(
            b"HTTP/1.1 500 Internal Server Error\r\n\r\n"
        ));
        assert!(!is_ok_response(b"SSH-2.0-OpenSSH\r\n"));
        assert!(!is_ok_response(b""));
    }

    #[test]
    fn dockerd_is_found_only_on_the_search_path() {
        let root = std::env::temp_dir().join(format!("kiln-docker-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("opt/bin")).unwrap();
        fs::write(root.join("opt/bin/dockerd"), "").unwrap();
        assert_eq!(find_dockerd(&root), None);
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::write(root.join("usr/bin/dockerd"), "").unwrap();
        assert_eq!(find_dockerd(&root), Some(root.join("usr/bin/dockerd")));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn ping_asks_for_ping_and_reads_the_status() {
        let dir = std::env::temp_dir().join(format!("kiln-docker-ping-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("docker.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let mut asked = Vec::new();
            for status in ["503 Service Unavailable", "200 OK"] {
                let (mut conn, _) = listener.accept().unwrap();
                let mut buf = [0u8; 256];
                let n = conn.read(&mut buf).unwrap();
                asked.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                write!(conn, "HTTP/1.0 {status}\r\n\r\nOK").unwrap();
            }
            asked
        });
        assert!(!ping(&sock).unwrap());
        assert!(ping(&sock).unwrap());
        let asked = server.join().unwrap();
        assert!(asked
            .iter()
            .all(|a| a.starts_with("GET /_ping HTTP/1.0\r\n")));
        fs::remove_dir_all(&dir).unwrap();
        assert!(ping(&sock).is_err());
    }
}
