//! Who the job is, from what the job cannot change.
//!
//! Every `CUSTOM_ENV_*` variable can be set by the job itself: GitLab lets a `.gitlab-ci.yml`
//! variable shadow a predefined one, so `CI_JOB_ID`, `CI_PROJECT_ID` or
//! `CI_CONCURRENT_ID` there are claims, not facts. What isolates jobs from each other is
//! therefore read from `$JOB_RESPONSE_FILE` instead: GitLab Runner writes GitLab's whole job
//! response (its `JobResponse`) there for every driver call, and that variable has no
//! `CUSTOM_ENV_` prefix, so no job can point it elsewhere. From it come the job id, the
//! project id (typed fields GitLab fills in), the job token (a secret only this job has),
//! and whether the ref is protected.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The runner's variable naming the job response file.
pub const JOB_RESPONSE_FILE: &str = "JOB_RESPONSE_FILE";

/// The job as GitLab described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// GitLab's job id (unique within a GitLab instance).
    pub job_id: u64,
    /// GitLab's project id.
    pub project_id: u64,
    /// True only if GitLab says the job runs for a protected ref (see [`is_protected`]).
    pub protected: bool,
    /// SHA-256 of the job token, in hex: what binds the job's state to this job.
    pub token_hash: String,
}

/// The parts of gitlab-runner's `JobResponse` (`common/network.go`) the driver uses;
/// everything else in the file is ignored.
#[derive(Debug, Deserialize)]
struct JobResponse {
    id: u64,
    token: String,
    job_info: JobInfo,
    #[serde(default)]
    variables: Vec<Variable>,
}

#[derive(Debug, Deserialize)]
struct JobInfo {
    project_id: u64,
}

#[derive(Debug, Deserialize)]
struct Variable {
    key: String,
    #[serde(default)]
    value: String,
}

impl Identity {
    /// Reads the job response file the runner named in `$JOB_RESPONSE_FILE`.
    pub fn load(response_file: Option<&Path>) -> Result<Identity> {
        let path = response_file.with_context(|| {
            format!(
                "${JOB_RESPONSE_FILE} is not set: kiln-gitlab takes the job's identity from the \
                 job response file that GitLab Runner's custom executor names there (never from \
                 job variables, which a job can set); run it from GitLab Runner"
            )
        })?;
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the job response file {} (${JOB_RESPONSE_FILE})",
                path.display()
            )
        })?;
        Identity::parse(&text).with_context(|| {
            format!(
                "the job response file {} (${JOB_RESPONSE_FILE}) is not a GitLab job response",
                path.display()
            )
        })
    }

    /// Parses a job response.
    pub fn parse(text: &str) -> Result<Identity> {
        let response: JobResponse = serde_json::from_str(text)?;
        if response.id == 0 {
            bail!("its job id is 0");
        }
        if response.job_info.project_id == 0 {
            bail!("its job_info.project_id is 0");
        }
        if response.token.is_empty() {
            bail!("it holds no job token");
        }
        Ok(Identity {
            job_id: response.id,
            project_id: response.job_info.project_id,
            protected: is_protected(
                response
                    .variables
                    .iter()
                    .map(|v| (v.key.as_str(), v.value.as_str())),
            ),
            token_hash: token_hash(&response.token),
        })
    }
}

/// A job is protected only if `CI_COMMIT_REF_PROTECTED` is among its variables and every
/// occurrence of it is "true". The list holds the predefined variables and the job's own
/// (YAML) ones together, and a job may repeat a predefined key: shadowing it with "false"
/// only lowers the job's own rights, while shadowing a predefined "false" with "true" still
/// leaves that "false" in the list.
pub fn is_protected<'a>(variables: impl IntoIterator<Item = (&'a str, &'a str)>) -> bool {
    let mut seen = false;
    for (key, value) in variables {
        if key == "CI_COMMIT_REF_PROTECTED" {
            if value != "true" {
                return false;
            }
            seen = true;
        }
    }
    seen
}

/// SHA-256 of a job token, in hex. Only this is ever written to disk.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(vars: &str) -> String {
        format!(
            r#"{{"id": 4711, "token": "glcbt-secret", "allow_git_fetch": true,
                "job_info": {{"name": "build", "stage": "test", "project_id": 12,
                              "project_name": "p"}},
                "git_info": {{"repo_url": "https://x/y.git", "ref": "main", "sha": "abc",
                              "before_sha": "000", "ref_type": "branch", "refspecs": [],
                              "depth": 20}},
                "variables": [{vars}]}}"#
        )
    }

    fn var(key: &str, value: &str) -> String {
        format!(
            r#"{{"key": "{key}", "value": "{value}", "public": true, "internal": false,
                "file": false, "masked": false, "raw": false}}"#
        )
    }

    #[test]
    fn identity_comes_from_the_typed_fields() {
        // The job's variables claim another job and project: they do not count.
        let vars = [
            var("CI_JOB_ID", "1"),
            var("CI_PROJECT_ID", "99"),
            var("CI_COMMIT_REF_PROTECTED", "true"),
        ]
        .join(",");
        let id = Identity::parse(&response(&vars)).unwrap();
        assert_eq!((id.job_id, id.project_id, id.protected), (4711, 12, true));
        assert_eq!(id.token_hash, token_hash("glcbt-secret"));
        assert_eq!(id.token_hash.len(), 64);
        assert!(!id.token_hash.contains("secret"));
    }

    #[test]
    fn bad_responses_are_refused() {
        for bad in [
            "",
            "{}",
            "not json",
            r#"{"id": 1, "token": "t"}"#,
            r#"{"id": "1", "token": "t", "job_info": {"project_id": 2}}"#,
            r#"{"id": 0, "token": "t", "job_info": {"project_id": 2}}"#,
            r#"{"id": 1, "token": "", "job_info": {"project_id": 2}}"#,
            r#"{"id": 1, "token": "t", "job_info": {"project_id": 0}}"#,
            r#"{"id": -1, "token": "t", "job_info": {"project_id": 2}}"#,
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad:?}");
        }
        let ok = r#"{"id": 1, "token": "t", "job_info": {"project_id": 2}}"#;
        assert!(!Identity::parse(ok).unwrap().protected);
        let err = Identity::load(None).unwrap_err();
        assert!(err.to_string().contains("JOB_RESPONSE_FILE"), "{err}");
        let err = Identity::load(Some(Path::new("/nonexistent/response.json"))).unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot read the job response file"),
            "{err:#}"
        );
    }

    #[test]
    fn protected_only_if_every_occurrence_says_true() {
        let p = |pairs: &[(&'static str, &'static str)]| is_protected(pairs.iter().copied());
        assert!(p(&[("CI_COMMIT_REF_PROTECTED", "true")]));
        assert!(p(&[
            ("CI_COMMIT_REF_PROTECTED", "true"),
            ("CI_COMMIT_REF_PROTECTED", "true")
        ]));
        // Missing: not protected.
        assert!(!p(&[]));
        assert!(!p(&[("CI_COMMIT_REF_NAME", "main")]));
        // An unprotected ref's job shadowing the predefined "false" with "true".
        assert!(!p(&[
            ("CI_COMMIT_REF_PROTECTED", "false"),
            ("CI_COMMIT_REF_PROTECTED", "true")
        ]));
        assert!(!p(&[
            ("CI_COMMIT_REF_PROTECTED", "true"),
            ("CI_COMMIT_REF_PROTECTED", "false")
        ]));
        assert!(!p(&[("CI_COMMIT_REF_PROTECTED", "TRUE")]));
        assert!(!p(&[("CI_COMMIT_REF_PROTECTED", "")]));
        // Through the parser, the order in the list does not matter either.
        let vars = [
            var("CI_COMMIT_REF_PROTECTED", "false"),
            var("CI_COMMIT_REF_PROTECTED", "true"),
        ]
        .join(",");
        assert!(!Identity::parse(&response(&vars)).unwrap().protected);
    }
}
