//! `kiln ctl`: one request to a running VM's control API; the response is printed as the
//! VM sent it.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::api;
use crate::cli::{CtlArgs, CtlRequest};
use crate::snapshot::SnapshotKind;
use crate::vmm::Request;

/// The API request for a `kiln ctl` subcommand; a relative snapshot directory is made
/// absolute here, since the VM's working directory may differ from ours.
pub(crate) fn request(ctl: &CtlRequest) -> anyhow::Result<Request> {
    Ok(match ctl {
        CtlRequest::Pause => Request::Pause,
        CtlRequest::Resume => Request::Resume,
        CtlRequest::Status => Request::Status,
        CtlRequest::Shutdown => Request::Shutdown,
        CtlRequest::Snapshot {
            dir,
            no_resume,
            diff,
        } => Request::Snapshot {
            dir: std::path::absolute(dir)
                .with_context(|| format!("cannot make {} absolute", dir.display()))?,
            resume: !no_resume,
            kind: if *diff {
                SnapshotKind::Diff
            } else {
                SnapshotKind::Full
            },
        },
    })
}

pub fn ctl(args: &CtlArgs) -> anyhow::Result<ExitCode> {
    let request = request(&args.request)?;
    let timeout = Some(Duration::from_secs(args.timeout.max(1)));
    let (line, outcome) = api::call(&args.api, &request, timeout)?;
    println!("{line}");
    if outcome.ok {
        return Ok(ExitCode::SUCCESS);
    }
    let error = outcome
        .error
        .unwrap_or_else(|| "the VM refused the request".into());
    anyhow::bail!("{error}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_snapshot_dirs_become_absolute() {
        let r = request(&CtlRequest::Snapshot {
            dir: "snap".into(),
            no_resume: true,
            diff: true,
        })
        .unwrap();
        let Request::Snapshot { dir, resume, kind } = r else {
            panic!("not a snapshot request: {r:?}");
        };
        assert!(dir.is_absolute() && dir.ends_with("snap"), "{dir:?}");
        assert!(!resume);
        assert_eq!(kind, SnapshotKind::Diff);
        assert_eq!(request(&CtlRequest::Status).unwrap(), Request::Status);
    }
}
