//! `kiln run`: boot a VM and run it until the guest ends it.

use std::process::ExitCode;
use std::time::Instant;

use super::common::{check_files, console_sink, run_to_end, RuntimeDir, Sockets};
use crate::api::SocketAccess;
use crate::cli::RunArgs;
use crate::config::VmConfig;
use crate::vmm::{MachineSpec, Vmm, VsockSpec};

pub fn run(args: &RunArgs, start: Instant) -> anyhow::Result<ExitCode> {
    let mut config: VmConfig = args.vm.to_config()?;
    // A store image is shared by every VM that boots it: this VM's writes go to an overlay
    // in a private runtime directory, removed when the VM ends.
    let _runtime = match (&args.vm.image, config.disks.first_mut()) {
        (Some(_), Some(root)) => {
            let runtime = RuntimeDir::create("run")?;
            root.overlay = Some(runtime.path().join("image.overlay"));
            Some(runtime)
        }
        _ => None,
    };
    check_files(&config)?;
    let _slot = args.vm.slot.enter(config.memory_mib, config.vcpus)?;
    let mut spec = MachineSpec::from_config(&config, console_sink(&config.serial)?, start);
    spec.vsock = args.vsock.as_ref().map(|uds_path| VsockSpec {
        cid: args.cid,
        uds_path: uds_path.clone(),
    });
    let access = SocketAccess::from_flag(args.socket_group.as_deref())?;
    let vmm = Vmm::build(spec)?;
    let sockets = Sockets {
        api: args.api.as_deref(),
        vsock: args.vsock.as_deref(),
        snapshot: None,
    };
    run_to_end(vmm, sockets, args.json, access)
}
