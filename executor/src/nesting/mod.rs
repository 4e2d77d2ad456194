//! `kiln-gitlab nesting serve`: GitLab Runner's VM-isolation ("nesting") provider. With
//! `[runners.autoscaler.vm_isolation]`, the runner dials this gRPC server on each instance
//! (through its SSH connection to the instance), has it boot a kiln VM of the job's image
//! in the job's slot, and runs the job over SSH in that VM.
//!
//! - [`provider`]: the rules the runner depends on (lazy Init, slots and the stomp, exact
//!   errors, recovery after a restart), over a [`backend::VmBackend`];
//! - [`kiln`]: the backend that runs `kiln run` VMs, or `kiln restore`s clones of a
//!   [`warm`] snapshot;
//! - [`service`]: the gRPC service; [`config`]: the server's settings.

pub mod backend;
pub mod client;
pub mod config;
#[cfg(test)]
pub mod fake;
pub mod kiln;
pub mod provider;
pub mod records;
pub mod service;
pub mod warm;

/// The messages and service generated from `proto/nesting.proto` at build time.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("nesting");
}

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use self::config::NestingConfig;

/// The command line's overrides of the config file.
#[derive(Debug, Clone, Default)]
pub struct ServeArgs {
    pub socket: Option<PathBuf>,
    pub listen: Option<String>,
    pub config: Option<PathBuf>,
}

/// Runs the server until SIGINT/SIGTERM. VMs keep running when it stops; a restarted
/// server takes them back from its state directory.
pub fn serve(args: &ServeArgs) -> Result<()> {
    let mut config = NestingConfig::load(args.config.as_deref())?;
    if let Some(s) = &args.socket {
        config.socket = s.clone();
    }
    if let Some(l) = &args.listen {
        config::listen_addr(l)?;
        config.listen = Some(l.clone());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: NestingConfig) -> Result<()> {
    let records = records::Records::open(&config.state_dir).with_context(|| {
        format!(
            "cannot use the state directory {}",
            config.state_dir.display()
        )
    })?;
    let backend = Arc::new(kiln::KilnBackend::new(config.clone()));
    let provider = Arc::new(provider::Provider::new(
        backend,
        records,
        config.settings.clone(),
    ));
    let recovered = provider
        .recover()
        .await
        .context("cannot read the VM records")?;
    let unix = bind_unix(&config)?;
    eprintln!(
        "nesting: serving on unix://{} ({} VMs still running; images from {}; slots 0-{})",
        config.socket.display(),
        recovered,
        config.image_store.display(),
        config.settings.slots - 1
    );
    let service =
        || proto::nesting_server::NestingServer::new(service::Service::new(provider.clone()));
    let mut servers = tokio::task::JoinSet::new();
    let unix_server = tonic::transport::Server::builder()
        .add_service(service())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(unix),
            stop_signal(),
        );
    servers.spawn(unix_server);
    if let Some(listen) = &config.listen {
        let addr = config::listen_addr(listen)?;
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        eprintln!("nesting: serving on {listen}");
        let tcp_server = tonic::transport::Server::builder()
            .add_service(service())
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(tcp),
                stop_signal(),
            );
        servers.spawn(tcp_server);
    }
    while let Some(r) = servers.join_next().await {
        r.context("server task failed")?.context("server failed")?;
    }
    let _ = std::fs::remove_file(&config.socket);
    eprintln!("nesting: stopped (VMs keep running)");
    Ok(())
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// Binds the Unix socket (replacing a stale one) with the configured mode and group.
fn bind_unix(config: &NestingConfig) -> Result<tokio::net::UnixListener> {
    let path = &config.socket;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use: another nesting server runs", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.socket_mode))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    if let Some(group) = &config.socket_group {
        let gid = group_id(group)?;
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {group}", path.display()))?;
    }
    Ok(listener)
}

/// A group's id from its name or number.
fn group_id(group: &str) -> Result<u32> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let text =
        std::fs::read_to_string(Path::new("/etc/group")).context("cannot read /etc/group")?;
    text.lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(group)).then(|| f.nth(1)?.parse().ok())?
        })
        .with_context(|| format!("socket_group {group:?}: no such group"))
}
