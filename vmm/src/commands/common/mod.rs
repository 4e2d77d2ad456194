//! What the subcommands share, kept here rather than in one command's module: reaching
//! the guest agent, parsing `--env`, checking the files a VM needs, the console sink, a
//! private runtime directory, and (in `run_to_end`) running a built or restored VM until it
//! ends.

mod run_to_end;
mod signals;
mod terminal;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use kiln_agent::client::{connect_ready, Client, ExecIo};
use kiln_agent::protocol::{ExecRequest, ExitStatus, AGENT_PORT};

use crate::config::{SerialOutput, VmConfig};
use crate::logcap::CappedFile;

pub(crate) use run_to_end::{run_to_end, seccomp_filters, Sockets};
pub(crate) use signals::forward_signals;
pub(crate) use terminal::{exec_on_terminal, require_terminal};

/// How long `kiln exec`, `kiln cp` and `kiln job` keep trying to reach the agent: an
/// attempt the guest drops without an answer (its agent not up yet, a VMM whose vsock
/// device lets connections through before the guest has handled a restore's transport
/// reset) times out and is retried within this bound.
pub(crate) const CONNECT_TOTAL: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection to the agent behind `uds` on which it has answered a ping; retried within
/// [`CONNECT_TOTAL`]. The request sent on it afterwards is sent once, never repeated.
pub(crate) fn connect_agent(uds: &Path) -> anyhow::Result<Client> {
    connect_ready(uds, AGENT_PORT, CONNECT_TOTAL)
        .with_context(|| format!("cannot reach the agent through {}", uds.display()))
}

/// Splits `K=V`.
pub(crate) fn parse_env(pairs: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => anyhow::bail!("--env {p:?}: expected KEY=VALUE"),
        })
        .collect()
}

/// Runs `request` on `client` with its output streamed to this process's stdout and
/// stderr; `started` hears the exec's id once its process runs (to cancel it on a signal).
pub(crate) fn exec_streamed(
    client: &mut Client,
    request: &ExecRequest,
    started: &mut dyn FnMut(u64),
) -> kiln_agent::client::Result<ExitStatus> {
    client.exec_with(
        request,
        ExecIo {
            stdin: None,
            stdout: &mut std::io::stdout(),
            stderr: &mut std::io::stderr(),
            on_started: Some(&mut |s| started(s.exec_id)),
        },
    )
}

/// kiln's exit code for a command that ended with `status`: its code, or 128 + the signal
/// that killed it.
pub(crate) fn exit_code(status: ExitStatus) -> std::process::ExitCode {
    std::process::ExitCode::from(u8::try_from(status.shell_code() & 0xff).unwrap_or(1))
}

/// An exec request for `argv` with `target`'s environment and working directory.
pub(crate) fn exec_request(
    target: &crate::cli::ExecTarget,
    argv: &[String],
) -> anyhow::Result<ExecRequest> {
    let mut req = ExecRequest::new(argv.iter().map(String::as_str));
    req.env = parse_env(&target.env)?;
    req.cwd = target.cwd.clone();
    Ok(req)
}

/// Where the guest's serial console goes, as `serial` says: this process's stdout, nowhere,
/// or a private file kept under its size cap.
pub(crate) fn console_sink(serial: &SerialOutput) -> anyhow::Result<Box<dyn Write + Send>> {
    Ok(match serial {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Null => Box::new(std::io::sink()),
        SerialOutput::File(path) => {
            let context = || format!("cannot open serial output file {}", path.display());
            // The guest writes this file: created 0600, an existing path must be a plain file
            // (a planted link is not followed) or a FIFO or terminal, and a plain file is
            // kept under its cap, rotating into `<path>.1`.
            let file = kiln_devices::private::open_append(path).with_context(context)?;
            let cap = crate::logcap::cap_from_env(
                crate::logcap::CONSOLE_MAX_ENV,
                crate::logcap::DEFAULT_CONSOLE_MAX_BYTES,
            )
            .map_err(anyhow::Error::msg)?;
            match cap {
                Some(cap) if file.metadata().with_context(context)?.is_file() => {
                    Box::new(CappedFile::open(path, cap).with_context(context)?)
                }
                _ => Box::new(file),
            }
        }
    })
}

/// Opens `path` and reads a byte, so that a missing file, a directory or a file without
/// read permission is reported by name before any VM is built.
fn check_readable(what: &str, path: &Path) -> anyhow::Result<()> {
    use std::io::Read;
    let context = || format!("cannot read {what} {}", path.display());
    let mut file = std::fs::File::open(path).with_context(context)?;
    if file.metadata().with_context(context)?.is_dir() {
        anyhow::bail!("cannot read {what} {}: it is a directory", path.display());
    }
    file.read(&mut [0u8; 1]).with_context(context)?;
    Ok(())
}

/// Checks that the kernel and the initramfs can be read, naming the one that cannot.
pub(crate) fn check_files(config: &VmConfig) -> anyhow::Result<()> {
    check_readable("kernel", &config.kernel)?;
    if let Some(initrd) = &config.initrd {
        check_readable("initramfs", initrd)?;
    }
    crate::disk::validate(&config.disks)?;
    Ok(())
}

/// A clear error for a snapshot path that is missing or not a directory.
pub(crate) fn check_snapshot_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bail!("snapshot {} is not a directory", dir.display()),
        Err(e) => bail!("cannot open snapshot directory {}: {e}", dir.display()),
    }
}

/// A private directory for a VM's sockets and temporary overlays, removed when dropped.
pub(crate) struct RuntimeDir(PathBuf);

impl RuntimeDir {
    pub(crate) fn create(what: &str) -> anyhow::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = base.join(format!("kiln-{what}-{}-{nanos:x}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create runtime directory {}", dir.display()))?;
        Ok(RuntimeDir(dir))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!("cannot remove {}: {e}", self.0.display());
        }
    }
}
