//! What GitLab Runner's custom executor hands every driver call: exit codes to use, the
//! exit-code file, the job response file, and the job's variables as `CUSTOM_ENV_<KEY>`.
//!
//! The job's variables are the job's own word: any of them, predefined names included, can
//! be set in its `.gitlab-ci.yml`. They choose what the job asked for (an image, a
//! snapshot); who the job is comes from the job response file (`crate::identity`).

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Exit code used for a build failure when `BUILD_FAILURE_EXIT_CODE` is not set (the driver
/// was not started by a runner).
pub const DEFAULT_BUILD_FAILURE: i32 = 1;
/// Exit code used for a system failure when `SYSTEM_FAILURE_EXIT_CODE` is not set.
pub const DEFAULT_SYSTEM_FAILURE: i32 = 2;

/// The runner's side of one driver call.
#[derive(Debug, Clone, Default)]
pub struct Contract {
    pub build_failure: i32,
    pub system_failure: i32,
    /// Where the real exit code of a failed script goes (first line).
    pub build_exit_code_file: Option<PathBuf>,
    /// `$JOB_RESPONSE_FILE`: GitLab's job response, written by the runner.
    pub job_response_file: Option<PathBuf>,
    /// The job's variables: `CUSTOM_ENV_<KEY>` without the prefix.
    pub vars: BTreeMap<String, String>,
}

impl Contract {
    /// Reads the contract from this process's environment.
    pub fn from_env() -> Contract {
        Self::from_vars(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// Reads the contract from `(name, value)` pairs (the environment, or a test's).
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Contract {
        let mut c = Contract {
            build_failure: DEFAULT_BUILD_FAILURE,
            system_failure: DEFAULT_SYSTEM_FAILURE,
            ..Contract::default()
        };
        for (key, value) in vars {
            match key.as_str() {
                "BUILD_FAILURE_EXIT_CODE" => {
                    c.build_failure = value.trim().parse().unwrap_or(DEFAULT_BUILD_FAILURE);
                }
                "SYSTEM_FAILURE_EXIT_CODE" => {
                    c.system_failure = value.trim().parse().unwrap_or(DEFAULT_SYSTEM_FAILURE);
                }
                "BUILD_EXIT_CODE_FILE" if !value.is_empty() => {
                    c.build_exit_code_file = Some(value.into());
                }
                crate::identity::JOB_RESPONSE_FILE if !value.is_empty() => {
                    c.job_response_file = Some(value.into());
                }
                _ => {
                    if let Some(name) = key.strip_prefix("CUSTOM_ENV_") {
                        c.vars.insert(name.to_string(), value);
                    }
                }
            }
        }
        c
    }

    /// A job variable (`CUSTOM_ENV_<key>`), if set and not empty.
    pub fn var(&self, key: &str) -> Option<&str> {
        self.vars
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// A job variable that is "1", "true" or "yes".
    pub fn flag(&self, key: &str) -> bool {
        matches!(
            self.var(key).map(str::to_ascii_lowercase).as_deref(),
            Some("1" | "true" | "yes")
        )
    }
}

/// How a driver call failed, which decides its exit code.
#[derive(Debug)]
pub enum Failure {
    /// The job's script failed with this exit code.
    Build(i32),
    /// kiln or the VM failed: the runner reports a system failure (and retries `prepare`).
    System(anyhow::Error),
    /// The runner cancelled the stage with this signal.
    Cancelled(i32),
}

impl Failure {
    /// The driver's exit code for this failure.
    pub fn exit_code(&self, contract: &Contract) -> i32 {
        match self {
            Failure::Build(_) => contract.build_failure,
            Failure::System(_) => contract.system_failure,
            Failure::Cancelled(signo) => 128 + signo,
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::System(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_runner_env_is_read() {
        let c = Contract::from_vars(pairs(&[
            ("BUILD_FAILURE_EXIT_CODE", "71"),
            ("SYSTEM_FAILURE_EXIT_CODE", "72"),
            ("BUILD_EXIT_CODE_FILE", "/tmp/x/code"),
            ("JOB_RESPONSE_FILE", "/tmp/x/response.json"),
            ("CUSTOM_ENV_JOB_RESPONSE_FILE", "/tmp/forged.json"),
            ("CUSTOM_ENV_CI_JOB_ID", "42"),
            ("CUSTOM_ENV_KILN_KEEP_FAILED", "True"),
            ("CUSTOM_ENV_EMPTY", ""),
            ("PATH", "/bin"),
        ]));
        assert_eq!((c.build_failure, c.system_failure), (71, 72));
        assert_eq!(c.build_exit_code_file, Some("/tmp/x/code".into()));
        // Only the runner's own variable names the response file.
        assert_eq!(c.job_response_file, Some("/tmp/x/response.json".into()));
        assert_eq!(c.var("CI_JOB_ID"), Some("42"));
        assert_eq!(c.var("EMPTY"), None);
        assert_eq!(c.var("PATH"), None);
        assert!(c.flag("KILN_KEEP_FAILED"));
        assert!(!c.flag("CI_JOB_ID"));
    }

    #[test]
    fn defaults_without_a_runner() {
        let c = Contract::from_vars(pairs(&[("BUILD_FAILURE_EXIT_CODE", "x")]));
        assert_eq!(c.build_failure, DEFAULT_BUILD_FAILURE);
        assert_eq!(c.system_failure, DEFAULT_SYSTEM_FAILURE);
        assert!(c.build_exit_code_file.is_none());
    }
}
