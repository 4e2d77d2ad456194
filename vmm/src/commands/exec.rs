//! `kiln exec`: run a command in a running VM through its agent, streaming its output, and
//! exit with its exit code; with `-t`, on a terminal in the guest driven from this one.

use std::process::ExitCode;

use anyhow::Context;

use super::common::{
    connect_agent, exec_on_terminal, exec_request, exec_streamed, exit_code, forward_signals,
    require_terminal,
};
use crate::cli::ExecArgs;

pub fn exec(args: &ExecArgs) -> anyhow::Result<ExitCode> {
    let req = exec_request(&args.target, &args.command)?;
    let uds = &args.target.vsock;
    if args.tty {
        require_terminal("kiln exec -t")?;
        return exec_on_terminal(uds, &mut connect_agent(uds)?, req);
    }
    let mut client = connect_agent(uds)?;
    let forwarder = forward_signals(uds.clone(), false)?;
    let status =
        exec_streamed(&mut client, &req, &mut |id| forwarder.arm(id)).context("exec failed")?;
    Ok(exit_code(status))
}
