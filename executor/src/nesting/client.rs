//! `kiln-gitlab nesting call`: the runner's calls from the command line, for operators
//! (what does the server hold? free a slot by hand) and for tests. Prints one JSON line.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::proto;
use super::proto::nesting_client::NestingClient;

#[derive(Debug, Clone)]
pub enum Call {
    Init { config: String },
    Create { image: String, slot: Option<i32> },
    Delete { id: String },
    List,
    Shutdown,
}

fn vm_json(vm: &proto::VirtualMachine) -> serde_json::Value {
    serde_json::json!({"id": vm.id, "name": vm.name, "addr": vm.addr})
}

pub fn call(socket: &Path, call: &Call) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let out = runtime.block_on(run(socket.to_owned(), call))?;
    println!("{out}");
    Ok(())
}

async fn run(socket: PathBuf, call: &Call) -> Result<serde_json::Value> {
    let path = socket.clone();
    // The URI is not used: every connection goes to the socket.
    let channel = tonic::transport::Endpoint::from_static("http://nesting")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    let mut c = NestingClient::new(channel);
    let status = |s: tonic::Status| anyhow::anyhow!("{:?}: {}", s.code(), s.message());
    Ok(match call {
        Call::Init { config } => {
            c.init(proto::InitRequest {
                config: config.clone().into_bytes(),
            })
            .await
            .map_err(status)?;
            serde_json::json!({})
        }
        Call::Create { image, slot } => {
            let r = c
                .create(proto::CreateRequest {
                    name: image.clone(),
                    slot: *slot,
                })
                .await
                .map_err(status)?
                .into_inner();
            let mut v = r.vm.as_ref().map(vm_json).unwrap_or_default();
            v["stomped"] = serde_json::json!(r.stomped_vm_id);
            v
        }
        Call::Delete { id } => {
            c.delete(proto::DeleteRequest { id: id.clone() })
                .await
                .map_err(status)?;
            serde_json::json!({})
        }
        Call::List => {
            let r = c
                .list(proto::ListRequest {})
                .await
                .map_err(status)?
                .into_inner();
            serde_json::Value::Array(r.vms.iter().map(vm_json).collect())
        }
        Call::Shutdown => {
            c.shutdown(proto::ShutdownRequest {})
                .await
                .map_err(status)?;
            serde_json::json!({})
        }
    })
}
