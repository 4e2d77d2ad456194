//! What a job runs: the command after `--` as is (an image needs no shell for it), or the
//! `--script` file, copied into the guest and run with the image's `/bin/sh`; and the one
//! error line for a job whose process could not start.

use anyhow::Context;
use kiln_agent::protocol::ExecRequest;

use crate::cli::JobArgs;

/// Where the script is put in the guest.
pub(super) const GUEST_SCRIPT: &str = "/tmp/kiln-job.sh";
/// What runs the script.
const GUEST_SHELL: &str = "/bin/sh";
/// The exit code of a job that did not start, a shell's for a command it cannot run.
pub(super) const NOT_STARTED_CODE: i32 = 127;

/// What the job runs: a command as is, or [`GUEST_SHELL`] with the script copied in first.
pub(super) struct Work {
    pub request: ExecRequest,
    /// The script's bytes, for [`GUEST_SCRIPT`].
    pub script: Option<Vec<u8>>,
}

/// The job's process did not start in the guest (the agent's reason): no such program, or
/// no shell for the script.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct NotStarted(pub String);

impl Work {
    /// The job `args` name, its script read.
    pub fn new(args: &JobArgs) -> anyhow::Result<Work> {
        Ok(match &args.script {
            Some(path) => Work {
                request: ExecRequest::new([GUEST_SHELL, GUEST_SCRIPT]),
                script: Some(
                    std::fs::read(path)
                        .with_context(|| format!("cannot read job script {}", path.display()))?,
                ),
            },
            None => Work {
                request: ExecRequest::new(args.command.iter().map(String::as_str)),
                script: None,
            },
        })
    }

    /// The error line for a job whose process did not start for `reason`, naming the shell
    /// when the script could not have it from `image`.
    pub fn not_started(&self, reason: &str, image: Option<&str>) -> String {
        if self.script.is_none() {
            return format!("the job's command did not start: {reason}");
        }
        if !reason.starts_with(&format!("executing {GUEST_SHELL}:")) {
            return format!("the job script did not start: {reason}");
        }
        let image = match image {
            Some(name) => format!("the image {name:?}"),
            None => "the guest".to_string(),
        };
        format!(
            "a job script runs with {GUEST_SHELL}, which {image} does not have ({reason}): \
             use an image with a shell, or run a program without one: kiln job -- CMD ARGS"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(script: bool) -> Work {
        Work {
            request: ExecRequest::new(["x"]),
            script: script.then(Vec::new),
        }
    }

    #[test]
    fn a_script_without_a_shell_is_told_which_shell_is_missing() {
        let reason = "executing /bin/sh: No such file or directory (os error 2)";
        let line = work(true).not_started(reason, Some("distroless"));
        assert!(
            line.starts_with("a job script runs with /bin/sh, which the image \"distroless\"")
                && line.contains(reason)
                && line.contains("kiln job -- CMD"),
            "{line}"
        );
        let line = work(true).not_started("changing to the working directory /w: x", None);
        assert_eq!(
            line,
            "the job script did not start: changing to the working directory /w: x"
        );
        let line = work(false).not_started("nope: command not found (PATH=/)", None);
        assert_eq!(
            line,
            "the job's command did not start: nope: command not found (PATH=/)"
        );
    }
}
