//! Runs the image's job script, for images that carry their job (`/etc/kiln/rc`).

use std::io;
use std::path::Path;

use kiln_agent::protocol::ExecRequest;
use kiln_agent::server::reaper::{Child, Reaper};
use kiln_agent::server::spawn::{Plan, Stdio};

/// Runs `/bin/sh <path>` if `path` exists, with stdio on the console and the agent's default
/// environment, waits for it and reports how it ended. Orphans ending meanwhile are reaped
/// by the reaper thread.
pub fn run(path: &str) {
    if !Path::new(path).exists() {
        return;
    }
    let req = ExecRequest::new(["/bin/sh", path]);
    let ended = Plan::new(&req)
        .map_err(io::Error::other)
        .and_then(|plan| plan.spawn(Stdio::default(), Reaper::global()))
        .and_then(Child::wait);
    match ended {
        Ok(status) => say!("rc {status}"),
        Err(e) => say!("running /bin/sh {path}: {e}"),
    }
}
