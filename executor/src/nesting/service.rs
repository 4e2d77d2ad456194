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
