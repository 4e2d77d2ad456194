//! The control API socket of a running VM (`kiln run --api <uds>`, `kiln restore --api`),
//! and its client (`kiln ctl`).
//!
//! Protocol: a Unix stream socket; the client writes one JSON request per line and reads
//! one JSON response line for each, in order. A connection may carry any number of
//! requests, and any number of connections may be open at once (each has a thread; every
//! request goes through [`Controller::call`], so the VM's event loop handles them one at a
//! time).
//!
//! Requests ([`Request`]): `{"cmd":"pause"}`, `{"cmd":"resume"}`, `{"cmd":"status"}`,
//! `{"cmd":"shutdown"}`, `{"cmd":"snapshot","dir":"/abs/dir","resume":true}`.
//! Responses: `{"ok":true, …fields}` or `{"ok":false,"error":"…"}`. A line that is not a
//! request gets an error response and the connection stays open; a line longer than
//! [`MAX_LINE`] bytes gets an error response and the connection is closed.
//!
//! The socket file is removed when the [`ApiServer`] is dropped (when the VM ends).
//!
//! Access: the socket is created mode 0600, so only the user kiln runs as (and root) can
//! connect; [`SocketAccess`] (`--socket-group NAME` or `$KILN_SOCKET_GROUP`) opens it and
//! the vsock socket to one group (mode 0660). Without a group, a client whose uid is
//! neither kiln's nor root's is refused (`SO_PEERCRED`). A client must send its first
//! request line within [`HANDSHAKE_TIMEOUT`], or the connection is closed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::seccomp::{Filters, ThreadKind};
use crate::vmm::{Controller, Reply, Request, Response};

/// The longest request line the server reads.
pub const MAX_LINE: usize = 64 * 1024;
/// How long a new connection has to send its first request line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stopping server waits for answers still being written (a `shutdown`'s
/// answer is written while the VM ends).
pub const ANSWER_GRACE: Duration = Duration::from_secs(2);
/// The variable that gives the socket group when `--socket-group` is not given (clones
/// started by `kiln fork` inherit it).
pub const SOCKET_GROUP_ENV: &str = "KILN_SOCKET_GROUP";

/// Who may use a VM's API and vsock sockets besides the user kiln runs as and root.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// Open the sockets to this group (mode 0660, group owner), else they stay 0600.
    pub group: Option<u32>,
}

impl SocketAccess {
    /// From `--socket-group` (a group name or number), else `$KILN_SOCKET_GROUP`, else
    /// none.
    pub fn from_flag(flag: Option<&str>) -> Result<SocketAccess, ApiError> {
        let env = std::env::var(SOCKET_GROUP_ENV).ok();
        let Some(name) = flag.or(env.as_deref()).filter(|s| !s.is_empty()) else {
            return Ok(SocketAccess::default());
        };
        let gid = kiln_devices::private::group_id(name).map_err(|source| ApiError::Group {
            name: name.to_owned(),
            source,
        })?;
        Ok(SocketAccess { group: Some(gid) })
    }

    /// The peer check that goes with this access.
    pub fn peers(&self) -> kiln_devices::private::PeerPolicy {
        kiln_devices::private::PeerPolicy::new(self.group)
    }

    /// Applies the group (if any) to the socket file at `path`.
    pub fn apply(&self, path: &Path) -> std::io::Result<()> {
        match self.group {
            Some(gid) => kiln_devices::private::share_with_group(path, gid),
            None => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket {0} already exists; remove it if no kiln uses it, or choose another path")]
    Exists(PathBuf),
    #[error("cannot listen on API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot reach the VM's API socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API socket {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("API socket {path} answered something that is not a response: {answer:?}")]
    BadAnswer { path: PathBuf, answer: String },
    #[error("--socket-group {name}: {source}")]
    Group {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot give socket {path} to its group: {source}")]
    Share {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A listening API socket; serves until dropped.
pub struct ApiServer {
    path: PathBuf,
    /// The socket file's (device, inode): only that file is removed on drop.
    id: Option<(u64, u64)>,
    stopping: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    answering: Answering,
}

/// The requests taken from clients whose answers are not written yet. A server being
/// dropped waits for them: the VM's process exits right after, and a `shutdown` request
/// is answered by the event loop just before the VM ends, so without the wait its client
/// could see the connection close with no answer.
#[derive(Clone, Default)]
struct Answering(Arc<(Mutex<usize>, Condvar)>);

/// One request being answered; the count goes down when it is dropped.
struct AnswerPending(Answering);

impl Answering {
    fn begin(&self) -> AnswerPending {
        *self.0 .0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        AnswerPending(self.clone())
    }

    /// Waits until no answer is pending, or `grace` has passed; false in the latter case.
    fn wait_idle(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        let (count, idle) = &*self.0;
        let mut pending = count.lock().unwrap_or_else(|e| e.into_inner());
        while *pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            pending = idle
                .wait_timeout(pending, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

impl Drop for AnswerPending {
    fn drop(&mut self) {
        let (count, idle) = &*self.0 .0;
        let mut pending = count.lock().unwrap_or_else(|e| e.into_inner());
        *pending = pending.saturating_sub(1);
        if *pending == 0 {
            idle.notify_all();
        }
    }
}

impl ApiServer {
    /// Creates the socket at `path` (which must not exist) and serves it on a thread of its
    /// own, a thread per connection.
    /// With `seccomp`, the API's threads run under the API filter. The socket is 0600, or
    /// 0660 with `access`'s group.
    pub fn start(
        path: &Path,
        controller: Controller,
        seccomp: Option<Filters>,
        access: SocketAccess,
    ) -> Result<ApiServer, ApiError> {
        if path.symlink_metadata().is_ok() {
            return Err(ApiError::Exists(path.to_owned()));
        }
        let listener =
            kiln_devices::private::bind_socket(path).map_err(|source| ApiError::Bind {
                path: path.to_owned(),
                source,
            })?;
        let id = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        let share = access.apply(path).map_err(|source| ApiError::Share {
            path: path.to_owned(),
            source,
        });
        if let Err(e) = share {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        let peers = access.peers();
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let answering = Answering::default();
        let pending = answering.clone();
        let accept = std::thread::Builder::new()
            .name("kiln-api".into())
            .spawn(move || {
                if let Some(filters) = seccomp {
                    if let Err(e) = filters.install(ThreadKind::Api) {
                        tracing::error!("the control API is not served: {e}");
                        return;
                    }
                }
                accept_loop(&listener, &controller, &stop, peers, &pending);
            });
        let mut server = ApiServer {
            path: path.to_owned(),
            id,
            stopping,
            accept: None,
            answering,
        };
        // On error, dropping `server` removes the socket file.
        server.accept = Some(accept.map_err(ApiError::Thread)?);
        Ok(server)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            // Wake the accept() so that the thread sees `stopping`.
            if UnixStream::connect(&self.path).is_ok() {
                let _ = accept.join();
            }
        }
        if !self.answering.wait_idle(ANSWER_GRACE) {
            tracing::warn!("API socket: answers still unwritten after {ANSWER_GRACE:?}");
        }
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| Some((m.dev(), m.ino())) == self.id);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!("cannot remove API socket {}: {e}", self.path.display());
            }
        }
    }
}

fn accept_loop(
    listener: &UnixListener,
    controller: &Controller,
    stopping: &AtomicBool,
    peers: kiln_devices::private::PeerPolicy,
    answering: &Answering,
) {
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("API socket: accept failed: {e}");
                continue;
            }
        };
        if let Err(why) = peers.allows(&stream) {
            tracing::warn!("API socket: refusing a client: {why}");
            continue;
        }
        let controller = controller.clone();
        let answering = answering.clone();
        let spawned = std::thread::Builder::new()
            .name("kiln-api-conn".into())
            .spawn(move || serve_connection(stream, &controller, &answering));
        if let Err(e) = spawned {
            tracing::warn!("API socket: cannot start a connection thread: {e}");
        }
    }
}

/// Answers requests on one connection until the client closes it. The first request
/// line must come within [`HANDSHAKE_TIMEOUT`] (this thread's own wait: the VM's event
/// loop is not involved until a request is complete).
fn serve_connection(stream: UnixStream, controller: &Controller, answering: &Answering) {
    serve_connection_within(stream, controller, answering, HANDSHAKE_TIMEOUT);
}

fn serve_connection_within(
    stream: UnixStream,
    controller: &Controller,
    answering: &Answering,
    first_line: Duration,
) {
    if stream.set_read_timeout(Some(first_line)).is_err() {
        return;
    }
    let mut waiting_for_first = true;
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut out = std::io::BufWriter::new(write_half);
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX) + 1;
        match reader.by_ref().take(limit).read_until(b'\n', &mut line) {
            Ok(0) => return,
            Err(e) => {
                if waiting_for_first
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                {
                    tracing::info!("API socket: closing a connection that sent no request within {first_line:?}");
                }
                return;
            }
            Ok(_) => {}
        }
        let complete = line.last() == Some(&b'\n');
        if complete && waiting_for_first {
            // A client that spoke may stay connected and idle between its requests.
            waiting_for_first = false;
            if reader.get_ref().set_read_timeout(None).is_err() {
                return;
            }
        }
        if !complete && line.len() > MAX_LINE {
            let answer = ApiResponse::error(format!(
                "request line longer than {MAX_LINE} bytes; closing the connection"
            ));
            let _ = writeln!(out, "{answer}").and_then(|()| out.flush());
            return;
        }
        let text = match std::str::from_utf8(&line) {
            Ok(t) => t.trim(),
            Err(_) => {
                let answer = ApiResponse::error("bad request: not UTF-8".into());
                if writeln!(out, "{answer}")
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        if text.is_empty() {
            if complete {
                continue;
            }
            return;
        }
        // Counted from before the event loop sees the request until its answer is written.
        let _pending = answering.begin();
        let answer = match serde_json::from_str::<Request>(text) {
            Ok(request) => ApiResponse::from(controller.call(request)),
            Err(e) => ApiResponse::error(format!(
                "bad request: {e}; send one JSON object per line, e.g. {{\"cmd\":\"status\"}}"
            )),
        };
        if writeln!(out, "{answer}")
            .and_then(|()| out.flush())
            .is_err()
        {
            return;
        }
    }
}

/// One response line: `{"ok":true, …the reply's fields}` or `{"ok":false,"error":"…"}`.
#[derive(Debug, Serialize)]
pub struct ApiResponse {
    pub ok: bool,
    #[serde(flatten)]
    pub reply: Option<Reply>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ApiResponse {
    fn error(message: String) -> Self {
        ApiResponse {
            ok: false,
            reply: None,
            error: Some(message),
        }
    }
}

impl From<Response> for ApiResponse {
    fn from(response: Response) -> Self {
        match response {
            Ok(reply) => ApiResponse {
                ok: true,
                reply: Some(reply),
                error: None,
            },
            Err(e) => Self::error(e.to_string()),
        }
    }
}

impl std::fmt::Display for ApiResponse {
    /// The line as sent (without its newline).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let line = serde_json::to_string(self).map_err(|_| std::fmt::Error)?;
        f.write_str(&line)
    }
}

/// What a client needs of any response line: whether the request succeeded, and why not.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Outcome {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
}

/// Sends one request to the API socket at `path` and returns the response line as sent
/// (without its newline) and its outcome. `timeout` bounds each read and write.
pub fn call(
    path: &Path,
    request: &Request,
    timeout: Option<Duration>,
) -> Result<(String, Outcome), ApiError> {
    let io = |what| {
        move |source| ApiError::Io {
            path: path.to_owned(),
            what,
            source,
        }
    };
    let mut stream = UnixStream::connect(path).map_err(|source| ApiError::Connect {
        path: path.to_owned(),
        source,
    })?;
    stream
        .set_read_timeout(timeout)
        .map_err(io("set timeout"))?;
    stream
        .set_write_timeout(timeout)
        .map_err(io("set timeout"))?;
    let mut line = serde_json::to_string(request).map_err(|e| ApiError::Io {
        path: path.to_owned(),
        what: "encode the request",
        source: e.into(),
    })?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(io("send the request"))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .take(u64::try_from(MAX_LINE).unwrap_or(u64::MAX))
        .read_line(&mut answer)
        .map_err(io("read the response"))?;
    let answer = answer.trim_end().to_string();
    match serde_json::from_str::<Outcome>(&answer) {
        Ok(outcome) => Ok((answer, outcome)),
        Err(_) => Err(ApiError::BadAnswer {
            path: path.to_owned(),
            answer,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_carry_ok_and_the_fields() {
        use crate::snapshot::SnapshotKind;
        use crate::vmm::{ControlError, SnapshotTaken, Status, VmState};
        let line = |r: Response| ApiResponse::from(r).to_string();
        assert_eq!(
            line(Ok(Reply::State {
                state: VmState::Paused
            })),
            r#"{"ok":true,"state":"paused"}"#
        );
        assert_eq!(
            line(Err(ControlError::NotRunning)),
            r#"{"ok":false,"error":"the VM is not running"}"#
        );
        let status = Reply::Status(Status {
            state: VmState::Running,
            vcpus: 2,
            memory_mib: 64,
            boot_ms: None,
        });
        assert_eq!(
            line(Ok(status)),
            r#"{"ok":true,"state":"running","vcpus":2,"memory_mib":64,"boot_ms":null}"#
        );
        let taken = Reply::Snapshot(SnapshotTaken {
            dir: "/s".into(),
            kind: SnapshotKind::Diff,
            memory_bytes_written: 4096,
            ms: 1.5,
            state: VmState::Paused,
        });
        assert_eq!(
            line(Ok(taken)),
            r#"{"ok":true,"dir":"/s","kind":"diff","memory_bytes_written":4096,"ms":1.5,"state":"paused"}"#
        );
        let outcome: Outcome = serde_json::from_str(&line(Err(ControlError::NoAnswer))).unwrap();
        assert_eq!(
            outcome,
            Outcome {
                ok: false,
                error: Some("the VM ended before answering".into())
            }
        );
    }

    #[test]
    fn an_existing_path_is_refused_and_left_alone() {
        let dir = crate::test_util::scratch("api-taken");
        let path = dir.join("taken");
        std::fs::write(&path, b"not a socket").unwrap();
        let (controller, _queue) = crate::vmm::control_channel().unwrap();
        let err = ApiServer::start(&path, controller, None, SocketAccess::default())
            .err()
            .expect("refused");
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_socket_is_private_and_a_silent_client_is_dropped() {
        use std::os::unix::fs::PermissionsExt;
        let dir = crate::test_util::scratch("api-private");
        let path = dir.join("api.sock");
        let (controller, _queue) = crate::vmm::control_channel().unwrap();
        let server =
            ApiServer::start(&path, controller.clone(), None, SocketAccess::default()).unwrap();
        let mode = std::fs::symlink_metadata(&path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        drop(server);

        // A connection that sends nothing is closed once the first-line timeout passes.
        let (mut client, server_end) = UnixStream::pair().unwrap();
        let serving = std::thread::spawn(move || {
            serve_connection_within(
                server_end,
                &controller,
                &Answering::default(),
                Duration::from_millis(100),
            );
        });
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).unwrap(), 0, "EOF: the server hung up");
        serving.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stopping_server_waits_for_pending_answers_only_as_long_as_they_last() {
        let answering = Answering::default();
        assert!(answering.wait_idle(Duration::ZERO), "nothing pending");
        let pending = answering.begin();
        assert!(
            !answering.wait_idle(Duration::from_millis(20)),
            "one pending"
        );
        let (started, waiting) = std::sync::mpsc::channel();
        let waiter = {
            let answering = answering.clone();
            std::thread::spawn(move || {
                started.send(()).unwrap();
                answering.wait_idle(Duration::from_secs(60))
            })
        };
        waiting.recv().unwrap();
        drop(pending);
        assert!(waiter.join().unwrap(), "woken when the answer was written");
    }

    #[test]
    fn a_shutdown_answer_is_written_before_the_server_is_gone() {
        use crate::vmm::VmState;
        let dir = crate::test_util::scratch("api-shutdown");
        let path = dir.join("api.sock");
        let (controller, queue) = crate::vmm::control_channel().unwrap();
        let server = ApiServer::start(&path, controller, None, SocketAccess::default()).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"{\"cmd\":\"shutdown\"}\n").unwrap();
        // The event loop's part: answer, end the VM (the server goes), and the process
        // would exit right after: by then the answer must be in the client's socket.
        let (request, reply) = queue.next().unwrap();
        assert_eq!(request, Request::Shutdown);
        reply
            .send(Ok(Reply::State {
                state: VmState::Stopping,
            }))
            .unwrap();
        drop(server);
        client.set_nonblocking(true).unwrap();
        let mut answer = String::new();
        let read = BufReader::new(&client).read_line(&mut answer);
        assert!(read.is_ok(), "no answer written: {read:?}");
        assert_eq!(answer, "{\"ok\":true,\"state\":\"stopping\"}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_socket_file_goes_with_the_server_and_bad_lines_get_errors() {
        let dir = crate::test_util::scratch("api-lines");
        let path = dir.join("api.sock");
        let (controller, queue) = crate::vmm::control_channel().unwrap();
        // No event loop: requests fail cleanly, bad lines are answered before that.
        drop(queue);
        let server = ApiServer::start(&path, controller, None, SocketAccess::default()).unwrap();
        let mut stream = UnixStream::connect(&path).unwrap();
        stream
            .write_all(b"not json\n{\"cmd\":\"status\"}\n")
            .unwrap();
        let mut lines = BufReader::new(stream.try_clone().unwrap()).lines();
        let first: serde_json::Value =
            serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(first["ok"], false);
        assert!(first["error"].as_str().unwrap().contains("bad request"));
        let second: serde_json::Value =
            serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(second["ok"], false);
        assert!(
            second["error"].as_str().unwrap().contains("not running"),
            "{second}"
        );
        drop(server);
        assert!(!path.exists(), "the socket file was removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
