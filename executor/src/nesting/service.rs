//! The gRPC service `nesting.Nesting` around a [`Provider`], logging one line per call.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use super::backend::{VmBackend, VmRecord};
use super::proto;
use super::provider::Provider;

pub struct Service<B> {
    provider: Arc<Provider<B>>,
}

impl<B> Service<B> {
    pub fn new(provider: Arc<Provider<B>>) -> Service<B> {
        Service { provider }
    }
}

fn vm(r: &VmRecord) -> proto::VirtualMachine {
    proto::VirtualMachine {
        id: r.id.clone(),
        name: r.image.clone(),
        addr: r.addr.clone(),
    }
}

/// One line on stderr (the journal, under systemd) per call: what was asked, the outcome
/// and how long it took.
fn log<T>(call: &str, started: Instant, result: &Result<T, Status>, ok: impl FnOnce(&T) -> String) {
    let ms = started.elapsed().as_millis();
    match result {
        Ok(v) => eprintln!("nesting: {call}: ok {} ({ms} ms)", ok(v)),
        Err(s) => eprintln!("nesting: {call}: {:?}: {} ({ms} ms)", s.code(), s.message()),
    }
}

#[tonic::async_trait]
impl<B: VmBackend> proto::nesting_server::Nesting for Service<B> {
    async fn init(
        &self,
        request: Request<proto::InitRequest>,
    ) -> Result<Response<proto::InitResponse>, Status> {
        let t = Instant::now();
        let r = self.provider.init(&request.get_ref().config);
        log("init", t, &r, |_| String::new());
        r.map(|()| Response::new(proto::InitResponse {}))
    }

    async fn create(
        &self,
        request: Request<proto::CreateRequest>,
    ) -> Result<Response<proto::CreateResponse>, Status> {
        let t = Instant::now();
        let req = request.into_inner();
        let r = self.provider.create(&req.name, req.slot).await;
        let call = format!("create name={:?} slot={:?}", req.name, req.slot);
        log(&call, t, &r, |(v, stomped)| {
            format!("id={} addr={} stomped={stomped:?}", v.id, v.addr)
        });
        r.map(|(v, stomped)| {
            Response::new(proto::CreateResponse {
                vm: Some(vm(&v)),
                stomped_vm_id: stomped,
            })
        })
    }

    async fn delete(
        &self,
        request: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        let t = Instant::now();
        let id = request.into_inner().id;
        let r = self.provider.delete(&id).await;
        log(&format!("delete id={id}"), t, &r, |_| String::new());
        r.map(|()| Response::new(proto::DeleteResponse {}))
    }

    async fn list(
        &self,
        _request: Request<proto::ListRequest>,
    ) -> Result<Response<proto::ListResponse>, Status> {
        let t = Instant::now();
        let r = self.provider.list().await;
        log("list", t, &r, |vms| format!("{} VMs", vms.len()));
        r.map(|vms| {
            Response::new(proto::ListResponse {
                vms: vms.iter().map(vm).collect(),
            })
        })
    }

    async fn shutdown(
        &self,
        _request: Request<proto::ShutdownRequest>,
    ) -> Result<Response<proto::ShutdownResponse>, Status> {
        let t = Instant::now();
        let r = self.provider.shutdown().await;
        log("shutdown", t, &r, |_| String::new());
        r.map(|()| Response::new(proto::ShutdownResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use prost::Message;
    use tonic::Code;

    use super::*;
    use crate::nesting::config::{Env, NestingConfig, NestingFile};
    use crate::nesting::fake::Fake;
    use crate::nesting::proto::nesting_client::NestingClient;
    use crate::nesting::provider::Settings;
    use crate::nesting::records::Records;

    #[test]
    fn messages_have_the_upstream_field_numbers_and_presence() {
        // slot 0 is sent (explicit presence): field 2, varint 0.
        let req = proto::CreateRequest {
            name: "a".into(),
            slot: Some(0),
        };
        assert_eq!(req.encode_to_vec(), [0x0a, 1, b'a', 0x10, 0]);
        let resp = proto::CreateResponse {
            vm: Some(proto::VirtualMachine {
                id: "i".into(),
                name: "n".into(),
                addr: "a".into(),
            }),
            stomped_vm_id: Some(String::new()),
        };
        assert_eq!(
            resp.encode_to_vec(),
            [0x0a, 9, 0x0a, 1, b'i', 0x12, 1, b'n', 0x1a, 1, b'a', 0x12, 0]
        );
        let init = proto::InitRequest {
            config: b"null".to_vec(),
        };
        assert_eq!(init.encode_to_vec(), [0x0a, 4, b'n', b'u', b'l', b'l']);
        let list = proto::ListResponse {
            vms: vec![proto::VirtualMachine::default(); 2],
        };
        assert_eq!(list.encode_to_vec(), [0x0a, 0, 0x0a, 0]);
    }

    /// The service on a Unix socket (as `serve` binds it), called by the generated client.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_runners_calls_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("run/nesting.sock");
        let file = NestingFile {
            socket: Some(sock.clone()),
            socket_mode: Some("0600".into()),
            ..NestingFile::default()
        };
        let config = NestingConfig::from_file(file, &Env::default()).unwrap();
        let listener = crate::nesting::bind_unix(&config).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second server on the same socket is refused.
        let err = crate::nesting::bind_unix(&config).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");

        let provider = Arc::new(Provider::new(
            Arc::new(Fake::new()),
            Records::open(dir.path()).unwrap(),
            Settings {
                slots: 2,
                memory_mib: 256,
                vcpus: 1,
                ssh_user: "ci".into(),
                ssh_password: Some("pw".into()),
            },
        ));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(proto::nesting_server::NestingServer::new(Service::new(
                    provider,
                )))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        let path = sock.clone();
        let channel = tonic::transport::Endpoint::from_static("http://nesting")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .unwrap();
        let mut c = NestingClient::new(channel);
        let create = |name: &str, slot: i32| proto::CreateRequest {
            name: name.into(),
            slot: Some(slot),
        };

        let err = c.list(proto::ListRequest {}).await.unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (Code::FailedPrecondition, "not initialized")
        );
        let init = || proto::InitRequest {
            config: b"null".to_vec(),
        };
        c.init(init()).await.unwrap();
        let err = c.init(init()).await.unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (Code::FailedPrecondition, "already initialized")
        );

        let first = c.create(create("debian-ci", 0)).await.unwrap().into_inner();
        let vm = first.vm.unwrap();
        assert_eq!(
            (vm.name.as_str(), vm.addr.as_str()),
            ("debian-ci", "10.77.0.2:22")
        );
        assert_eq!(first.stomped_vm_id, None);
        let second = c.create(create("alpine", 0)).await.unwrap().into_inner();
        assert_eq!(second.stomped_vm_id.as_deref(), Some(vm.id.as_str()));
        let err = c.create(create("nope", 1)).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert!(
            err.message().contains("debian-ci, alpine"),
            "{}",
            err.message()
        );
        let err = c.create(create("alpine", 2)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);

        let vms = c
            .list(proto::ListRequest {})
            .await
            .unwrap()
            .into_inner()
            .vms;
        assert_eq!(vms.len(), 1);
        assert_eq!(vms[0].name, "alpine");
        let id = vms[0].id.clone();
        c.delete(proto::DeleteRequest { id: id.clone() })
            .await
            .unwrap();
        let err = c.delete(proto::DeleteRequest { id }).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        c.create(create("alpine", 1)).await.unwrap();
        c.shutdown(proto::ShutdownRequest {}).await.unwrap();
        assert!(c
            .list(proto::ListRequest {})
            .await
            .unwrap()
            .into_inner()
            .vms
            .is_empty());

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
