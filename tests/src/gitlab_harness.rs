//! A contract harness for `kiln-gitlab`: plays GitLab Runner's side of the custom executor.
//!
//! Jobs are described in Rust ([`Job`]): their variables and the commands of each stage.
//! [`Job::files`] turns them into the files a test-bed script needs: `<job>/env` (the
//! job's variables as `CUSTOM_ENV_*`), `<job>/response.json` (GitLab's job response, which
//! the runner names in `$JOB_RESPONSE_FILE`: job id, token, project id, and the
//! predefined variables followed by the job's own) and one script per stage, of the shape
//! the runner generates for its bash shell ([`stage_script`]). [`HARNESS`] is the runner itself, in
//! POSIX shell (busybox in the test bed): `gl_setup` writes the driver config and the image
//! store, `gl_job NAME` drives one whole job (config, prepare with the runner's retries,
//! every stage in order, cleanup), `gl_cancel` cancels a stage the way the runner does.

/// `$BUILD_FAILURE_EXIT_CODE` the harness hands the driver (not 1, so that a driver that
/// exits 1 on a failure is caught).
pub const BUILD_FAILURE: i32 = 71;
/// `$SYSTEM_FAILURE_EXIT_CODE` the harness hands the driver.
pub const SYSTEM_FAILURE: i32 = 72;
/// The guest's project checkout (`CI_PROJECT_DIR`).
pub const PROJECT_DIR: &str = "/builds/group/project";
/// `CUSTOM_ENV_CI_RUNNER_ID` of every job.
pub const RUNNER_ID: &str = "1";
/// The project of jobs that name none.
pub const PROJECT_ID: u64 = 7;

/// The stages up to and including the user's script, in the runner's order.
pub const MAIN_STAGES: &[&str] = &[
    "prepare_script",
    "get_sources",
    "restore_cache",
    "download_artifacts",
    "build_script",
];
/// The stages after a successful `build_script`.
pub const SUCCESS_STAGES: &[&str] = &[
    "after_script",
    "archive_cache",
    "upload_artifacts_on_success",
    "cleanup_file_variables",
];
/// The stages after a failed one.
pub const FAILURE_STAGES: &[&str] = &[
    "after_script",
    "archive_cache_on_failure",
    "upload_artifacts_on_failure",
    "cleanup_file_variables",
];

/// One CI job as the runner sees it.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    pub id: u32,
    /// GitLab's project id (`job_info.project_id` of the job response).
    pub project_id: u64,
    /// The job token (`token` of the job response).
    pub token: String,
    /// The variables GitLab predefines (`CI_JOB_ID`, `CI_PROJECT_ID`,
    /// `CI_COMMIT_REF_PROTECTED`, …), first in the job response's list.
    pub predefined: Vec<(String, String)>,
    /// The job's own (`.gitlab-ci.yml`) variables, after them in that list; one of the same
    /// key as a predefined one shadows it.
    pub yaml: Vec<(String, String)>,
    /// Commands per stage; a stage without an entry prints `stage-output <job> <stage>`.
    pub stages: Vec<(String, Vec<String>)>,
    /// `image: pull_policy:` of the job's `.gitlab-ci.yml` (the job response's
    /// `image.pull_policy`); empty: none.
    pub pull_policy: Vec<String>,
}

impl Job {
    pub fn new(name: &str, id: u32) -> Job {
        let predefined = [
            ("CI", "true"),
            ("GITLAB_CI", "true"),
            ("CI_RUNNER_ID", RUNNER_ID),
            ("CI_JOB_ID", &id.to_string()),
            ("CI_JOB_NAME", name),
            ("CI_PROJECT_ID", &PROJECT_ID.to_string()),
            ("CI_PROJECT_DIR", PROJECT_DIR),
            ("CI_BUILDS_DIR", "/builds"),
            ("CI_COMMIT_REF_PROTECTED", "false"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Job {
            name: name.to_string(),
            id,
            project_id: PROJECT_ID,
            token: format!("glcbt-token-of-job-{id}"),
            predefined,
            yaml: Vec::new(),
            stages: Vec::new(),
            pull_policy: Vec::new(),
        }
    }

    /// Sets the job's `image: pull_policy:`.
    pub fn pull_policy(mut self, policies: &[&str]) -> Job {
        self.pull_policy = policies.iter().map(|p| p.to_string()).collect();
        self
    }

    /// Sets (or replaces) a job variable of the job's own, as `variables:` in
    /// `.gitlab-ci.yml` does: it may shadow a predefined one.
    pub fn var(mut self, key: &str, value: &str) -> Job {
        self.yaml.retain(|(k, _)| k != key);
        self.yaml.push((key.to_string(), value.to_string()));
        self
    }

    /// Makes the job one of project `id` (GitLab's word, and the predefined variable).
    pub fn project(mut self, id: u64) -> Job {
        self.project_id = id;
        self.predefine("CI_PROJECT_ID", &id.to_string())
    }

    /// Makes the job one of a protected ref.
    pub fn protected(self) -> Job {
        self.predefine("CI_COMMIT_REF_PROTECTED", "true")
    }

    /// Gives the job another token (another job, as far as the driver can tell).
    pub fn token(mut self, token: &str) -> Job {
        self.token = token.to_string();
        self
    }

    fn predefine(mut self, key: &str, value: &str) -> Job {
        for (k, v) in &mut self.predefined {
            if k == key {
                *v = value.to_string();
            }
        }
        self
    }

    /// The variables as the job sees them (and the driver gets them as `CUSTOM_ENV_*`):
    /// the predefined ones, each shadowed by a job variable of the same key.
    pub fn vars(&self) -> Vec<(String, String)> {
        let mut vars: Vec<(String, String)> = self
            .predefined
            .iter()
            .filter(|(k, _)| !self.yaml.iter().any(|(y, _)| y == k))
            .cloned()
            .collect();
        vars.extend(self.yaml.iter().cloned());
        vars
    }

    /// GitLab's job response for this job, in the shape of gitlab-runner's `JobResponse`.
    pub fn response(&self) -> String {
        let variables: Vec<serde_json::Value> = self
            .predefined
            .iter()
            .chain(&self.yaml)
            .map(|(k, v)| {
                serde_json::json!({"key": k, "value": v, "public": true, "internal": false,
                                   "file": false, "masked": false, "raw": false})
            })
            .collect();
        let image = self
            .yaml
            .iter()
            .find(|(k, _)| k == "CI_JOB_IMAGE")
            .map_or("", |(_, v)| v.as_str());
        serde_json::json!({
            "image": {"name": image, "pull_policy": self.pull_policy},
            "id": self.id,
            "token": self.token,
            "allow_git_fetch": true,
            "job_info": {"name": self.name, "stage": "test", "project_id": self.project_id,
                         "project_name": "project"},
            "git_info": {"repo_url": "https://gitlab.example/group/project.git", "ref": "main",
                         "sha": "0123456789abcdef0123456789abcdef01234567",
                         "before_sha": "0000000000000000000000000000000000000000",
                         "ref_type": "branch", "refspecs": [], "depth": 20},
            "variables": variables,
        })
        .to_string()
    }

    /// Sets a stage's commands.
    pub fn stage(mut self, stage: &str, commands: &[&str]) -> Job {
        self.stages.retain(|(s, _)| s != stage);
        self.stages.push((
            stage.to_string(),
            commands.iter().map(|c| c.to_string()).collect(),
        ));
        self
    }

    fn commands(&self, stage: &str) -> Vec<String> {
        self.stages
            .iter()
            .find(|(s, _)| s == stage)
            .map(|(_, c)| c.clone())
            .unwrap_or_else(|| vec![format!("echo stage-output {} {stage}", self.name)])
    }

    /// `<name>/env`, `<name>/response.json` and `<name>/<stage>` for every stage, for
    /// `Runner::run`'s `$FILES`.
    pub fn files(&self) -> Vec<(String, Vec<u8>)> {
        let vars = self.vars();
        let mut env = String::new();
        for (k, v) in &vars {
            env.push_str(&format!("export CUSTOM_ENV_{k}={}\n", sh_quote(v)));
        }
        let mut files = vec![
            (format!("{}/env", self.name), env.into_bytes()),
            (
                format!("{}/response.json", self.name),
                self.response().into_bytes(),
            ),
        ];
        let mut stages: Vec<&str> = Vec::new();
        for stage in MAIN_STAGES
            .iter()
            .chain(SUCCESS_STAGES)
            .chain(FAILURE_STAGES)
        {
            if !stages.contains(stage) {
                stages.push(stage);
            }
        }
        for stage in stages {
            let script = stage_script(&vars, stage, &self.commands(stage));
            files.push((format!("{}/{stage}", self.name), script.into_bytes()));
        }
        files
    }
}

/// A stage script of the shape GitLab Runner generates for its bash shell: a `set -eo
/// pipefail` preamble, then the whole body as one ANSI-C quoted string run by `: | (eval
/// …)` (so that nothing in it reads the script from stdin), exporting the job's variables,
/// entering the project directory (created by `get_sources`), and echoing each command in
/// green before running it. The `( … )` is the runner's `FF_USE_NEW_BASH_EVAL_STRATEGY`
/// shape: with a bare `: | eval …` under `set -e`, bash 5.2 turns a failing command's exit
/// code into 1 (a runner-side limit that no driver can undo).
pub fn stage_script(vars: &[(String, String)], stage: &str, commands: &[String]) -> String {
    let mut body = String::new();
    for (k, v) in vars {
        body.push_str(&format!("export {k}={}\n", ansi_c_quote(v)));
    }
    match stage {
        "prepare_script" => {}
        "get_sources" => body.push_str(&format!(
            "mkdir -p {dir}\ncd {dir}\n",
            dir = ansi_c_quote(PROJECT_DIR)
        )),
        _ => body.push_str(&format!("cd {}\n", ansi_c_quote(PROJECT_DIR))),
    }
    for command in commands {
        body.push_str(&format!(
            "echo {}\n{command}\n",
            ansi_c_quote(&format!("\x1b[32;1m$ {command}\x1b[0;m"))
        ));
    }
    format!(
        "#!/usr/bin/env bash\n\nset -eo pipefail\nset +o noclobber\n: | (eval {})\nexit 0\n",
        ansi_c_quote(&body)
    )
}

/// Bash's `$'…'` quoting, as the runner writes its scripts.
pub fn ansi_c_quote(s: &str) -> String {
    let mut out = String::from("$'");
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// POSIX single quoting.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The runner's side, in POSIX shell. Needs `$KILN`, `$KILN_GITLAB`, `$GUEST_VMLINUX` and
/// the files of [`Job::files`] plus `bash.cpio` (a guest image with bash) in `$FILES`.
///
/// - `gl_setup`: the driver's config (`$KILN_GITLAB_CONFIG`), an image store with
///   `default` (the guest kernel + `bash.cpio`) and `broken` (a kernel that is not one),
///   state under `./state`, snapshots under `./snaps`, jails (the default) under `./jails`,
///   and `net = "$GL_NET"` if `$GL_NET` is set.
/// - `gl_call JOB ARGS…`: one driver call as the runner makes it: in its own process group
///   (its pid, which is the group's id, in `jobs/JOB/driver.pid`), cwd = the job's
///   `$TMPDIR`, the contract's variables (`$JOB_RESPONSE_FILE` naming the job's
///   `response.json`) and the job's `CUSTOM_ENV_*`; output appended to the job log
///   `jobs/JOB/log` (or to `$GL_OUT` if set).
/// - `gl_prepare JOB`: `prepare`, retried up to 3 times on a system failure, as the runner
///   does; prints `GL-PREPARE-JOB=<code> <attempts>`.
/// - `gl_stage JOB STAGE`: writes the stage's script into the job's `$TMPDIR`, logs the
///   runner's `section_start:…:STAGE` line, calls `run`, removes the script.
/// - `gl_job JOB`: config, prepare, the stages in order (the failure stages after a failed
///   one), cleanup; prints `GL-EXIT-JOB=<the job's result>` and `GL-EXITFILE-JOB=<first
///   line of $BUILD_EXIT_CODE_FILE>`.
/// - `gl_cancel JOB STAGE MARKER term|kill`: runs STAGE in the background, waits until MARKER
///   is in the log, then SIGTERM to the driver's process group (SIGKILL after 15 s) or
///   SIGKILL at once; prints `GL-CANCEL-RC-JOB=<driver's exit code>` and
///   `GL-CANCEL-SECS-JOB=<seconds from signal to exit>`.
/// - `gl_jobdir ID`: the driver's state directory of job ID; `gl_vm_pid ID`: the pid of
///   the job's VM (its `kiln jail`, or its kiln if unjailed) from the driver's state;
///   `gl_vmm_pid ID`: the pid of the jailed VMM itself (as `kiln jail` logged it);
///   `gl_alive PID`: does any of its threads still run (zombies do not count); `gl_log
///   JOB`: prints `GL-LOG=JOB` and the log.
/// - `gl_wait PID SECS`: waits for a background job up to SECS; if it is still running,
///   prints `GL-HUNG=PID`, the processes, the tails of the VMs' logs and, from each guest
///   twice, its uptime, timer interrupts and processes, and fails.
pub const HARNESS: &str = r#"
GL_BUILD_FAILURE=71
GL_SYSTEM_FAILURE=72
gl_setup() {
  GL_ROOT=$PWD
  mkdir -p "$GL_ROOT/images/default" "$GL_ROOT/images/broken" "$GL_ROOT/jobs"
  # The driver's own directories are private, as docs/gitlab.md asks of an operator.
  mkdir -p -m 700 "$GL_ROOT/state" "$GL_ROOT/snaps" "$GL_ROOT/jails"
  ln -sf "$GUEST_VMLINUX" "$GL_ROOT/images/default/kernel"
  ln -sf "$FILES/bash.cpio" "$GL_ROOT/images/default/initrd"
  echo "not a kernel" > "$GL_ROOT/images/broken/kernel"
  cat > "$GL_ROOT/kiln-gitlab.toml" <<EOF
kiln = "$KILN"
state_dir = "$GL_ROOT/state"
images_dir = "$GL_ROOT/images"
snapshot_dir = "$GL_ROOT/snaps"
jail_base = "$GL_ROOT/jails"
memory_mib = 256
boot_timeout_secs = 60
kill_grace_secs = 3
EOF
  [ -z "$GL_NET" ] || echo "net = \"$GL_NET\"" >> "$GL_ROOT/kiln-gitlab.toml"
  export KILN_GITLAB_CONFIG="$GL_ROOT/kiln-gitlab.toml"
}
gl_dir() { echo "$GL_ROOT/jobs/$1"; }
gl_call() {
  gl_j=$1; shift
  gl_d=$(gl_dir "$gl_j")
  mkdir -p "$gl_d/tmp"
  ( cd "$gl_d/tmp" || exit 99
    export TMPDIR="$gl_d/tmp" BUILD_FAILURE_EXIT_CODE=$GL_BUILD_FAILURE \
      SYSTEM_FAILURE_EXIT_CODE=$GL_SYSTEM_FAILURE \
      BUILD_EXIT_CODE_FILE="$gl_d/tmp/build-exit-code" \
      JOB_RESPONSE_FILE="$FILES/$gl_j/response.json"
    . "$FILES/$gl_j/env"
    exec sh -c 'echo $$ > "$0"; exec setsid "$KILN_GITLAB" "$@"' "$gl_d/driver.pid" "$@"
  ) >> "${GL_OUT:-$gl_d/log}" 2>&1
}
gl_prepare() {
  gl_n=0
  while :; do
    gl_n=$((gl_n + 1))
    gl_call "$1" prepare
    gl_rc=$?
    [ $gl_rc -eq $GL_SYSTEM_FAILURE ] && [ $gl_n -lt 3 ] && continue
    break
  done
  echo "GL-PREPARE-$1=$gl_rc $gl_n"
  return $gl_rc
}
gl_stage() {
  gl_d=$(gl_dir "$1")
  cp "$FILES/$1/$2" "$gl_d/tmp/script-$2"
  echo "section_start:$(date +%s):$2" >> "$gl_d/log"
  gl_call "$1" run "$gl_d/tmp/script-$2" "$2"
  gl_src=$?
  rm -f "$gl_d/tmp/script-$2"
  return $gl_src
}
gl_job() {
  gl_d=$(gl_dir "$1")
  mkdir -p "$gl_d/tmp"
  : > "$gl_d/log"
  GL_OUT="$gl_d/config.json" gl_call "$1" config
  gl_result=0
  gl_prepare "$1" || gl_result=$gl_rc
  if [ $gl_result -eq 0 ]; then
    for gl_s in prepare_script get_sources restore_cache download_artifacts build_script; do
      gl_stage "$1" $gl_s || { gl_result=$?; break; }
    done
    if [ $gl_result -eq 0 ]; then
      gl_after="after_script archive_cache upload_artifacts_on_success cleanup_file_variables"
    else
      gl_after="after_script archive_cache_on_failure upload_artifacts_on_failure cleanup_file_variables"
    fi
    for gl_s in $gl_after; do gl_stage "$1" $gl_s; done
  fi
  gl_call "$1" cleanup
  echo "GL-CLEANUP-$1=$?"
  echo "GL-EXIT-$1=$gl_result"
  echo "GL-EXITFILE-$1=$(head -n 1 "$gl_d/tmp/build-exit-code" 2>/dev/null)"
}
gl_cancel() {
  gl_d=$(gl_dir "$1")
  cp "$FILES/$1/$2" "$gl_d/tmp/script-$2"
  echo "section_start:$(date +%s):$2" >> "$gl_d/log"
  rm -f "$gl_d/driver.pid"
  gl_call "$1" run "$gl_d/tmp/script-$2" "$2" &
  gl_bg=$!
  gl_n=0
  until grep -q "$3" "$gl_d/log" 2>/dev/null; do
    gl_n=$((gl_n + 1)); [ $gl_n -lt 600 ] || break; sleep 0.1
  done
  gl_pg=$(cat "$gl_d/driver.pid")
  gl_t0=$(cut -d. -f1 /proc/uptime)
  if [ "$4" = kill ]; then
    kill -KILL -$gl_pg
  else
    kill -TERM -$gl_pg
    gl_n=0
    while gl_alive $gl_pg && [ $gl_n -lt 150 ]; do gl_n=$((gl_n + 1)); sleep 0.1; done
    gl_alive $gl_pg && kill -KILL -$gl_pg
  fi
  wait $gl_bg
  gl_rc=$?
  echo "GL-CANCEL-RC-$1=$gl_rc"
  echo "GL-CANCEL-SECS-$1=$(( $(cut -d. -f1 /proc/uptime) - gl_t0 ))"
  rm -f "$gl_d/tmp/script-$2"
}
gl_jobdir() { echo "$GL_ROOT/state/job-$1"; }
# Prints "MODE:PATH" for each directory, socket or file under the given trees that others
# may read or write (a link to a file the jobs were given, such as an image's kernel, is not
# the driver's to change, and a symlink has no mode of its own).
gl_open_to_others() {
  find "$@" \( -type d -o -type s -o -type f \) 2>/dev/null | while read -r gl_p; do
    set -- $(stat -c '%a %h %F' "$gl_p")
    [ "$3" = regular ] && [ "$2" -gt 1 ] && continue
    case $1 in *[2-7]) echo "$1:$gl_p" ;; esac
  done
}
gl_vm_pid() { cut -d' ' -f1 "$(gl_jobdir "$1")/kiln.pid" 2>/dev/null; }
gl_vmm_pid() { sed -n 's/^kiln jail: .* runs as pid \([0-9]*\) .*/\1/p' "$(gl_jobdir "$1")/kiln.log" 2>/dev/null; }
gl_alive() {
  [ -n "$1" ] || return 1
  for gl_t in /proc/$1/task/*/status; do
    [ -r "$gl_t" ] && ! grep -q '^State:[[:space:]]*[ZX]' "$gl_t" 2>/dev/null && return 0
  done
  return 1
}
gl_log() { echo "GL-LOG=$1"; cat "$(gl_dir "$1")/log"; }
gl_wait() {
  gl_n=0
  while kill -0 "$1" 2>/dev/null && [ $gl_n -lt $(($2 * 10)) ]; do gl_n=$((gl_n + 1)); sleep 0.1; done
  if kill -0 "$1" 2>/dev/null; then
    echo "GL-HUNG=$1"
    ps -o pid,pgid,stat,args
    for gl_f in "$GL_ROOT"/state/*/kiln.log "$GL_ROOT"/state/*/console.log; do
      echo "== $gl_f"; tail -n 20 "$gl_f"
    done
    # Does the guest's clock run, do its timer interrupts come? Twice, 2 s apart.
    for gl_i in 1 2; do
      for gl_f in "$GL_ROOT"/state/*/vsock.sock; do
        echo "== $gl_f ($gl_i)"
        timeout 10 "$KILN" exec --vsock "$gl_f" -- sh -c \
          'cat /proc/uptime; grep -E "LOC|timer" /proc/interrupts; ps -o pid,stat,args'
      done
      sleep 2
    done
    return 1
  fi
  wait "$1"
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_is_bash_ansi_c() {
        assert_eq!(ansi_c_quote("a'b\\c\nd\x1b"), r"$'a\'b\\c\nd\x1b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn stage_scripts_have_the_runners_shape() {
        let job = Job::new("a", 5).stage("build_script", &["make test", "echo 'done'"]);
        let files = job.files();
        let build = files.iter().find(|f| f.0 == "a/build_script").unwrap();
        let text = String::from_utf8(build.1.clone()).unwrap();
        assert!(text.starts_with("#!/usr/bin/env bash\n\nset -eo pipefail\n"));
        assert!(
            text.contains(": | (eval $'export CI=$\\'true\\'\\n"),
            "{text}"
        );
        assert!(text.contains("make test\\n"), "{text}");
        assert!(files.iter().any(|f| f.0 == "a/env"));
        assert!(files.iter().any(|f| f.0 == "a/archive_cache_on_failure"));
        let mut names: Vec<_> = files.iter().map(|f| &f.0).collect();
        let count = names.len();
        names.sort();
        names.dedup();
        assert_eq!(count, names.len(), "one file per stage");
    }

    #[test]
    fn responses_hold_the_predefined_variables_then_the_jobs() {
        let job = Job::new("x", 9)
            .project(8)
            .protected()
            .var("CI_PROJECT_ID", "7")
            .token("secret");
        let r: serde_json::Value = serde_json::from_str(&job.response()).unwrap();
        assert_eq!(
            (r["id"].as_u64(), r["token"].as_str()),
            (Some(9), Some("secret"))
        );
        assert_eq!(r["job_info"]["project_id"], 8);
        let vars = r["variables"].as_array().unwrap();
        let of = |key: &str| -> Vec<&str> {
            vars.iter()
                .filter(|v| v["key"] == key)
                .map(|v| v["value"].as_str().unwrap())
                .collect()
        };
        assert_eq!(of("CI_PROJECT_ID"), ["8", "7"]);
        assert_eq!(of("CI_COMMIT_REF_PROTECTED"), ["true"]);
        // The job sees (and the driver gets as CUSTOM_ENV_) its own value.
        let seen = job.vars();
        assert!(seen.contains(&("CI_PROJECT_ID".into(), "7".into())));
        assert_eq!(seen.iter().filter(|(k, _)| k == "CI_PROJECT_ID").count(), 1);
    }

    #[test]
    fn stage_scripts_run_in_bash_fed_on_stdin() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let vars = vec![("GREETING".to_string(), "it's \"here\"".to_string())];
        let commands = vec![
            "echo \"$GREETING\"".to_string(),
            "cat; echo stdin-was-empty".to_string(),
            "sh -c 'exit 3'".to_string(),
            "echo not reached".to_string(),
        ];
        let script = stage_script(&vars, "prepare_script", &commands);
        let mut child = Command::new("bash")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(3), "{text}");
        assert!(text.contains("it's \"here\"\n"), "{text}");
        assert!(text.contains("stdin-was-empty"), "{text}");
        assert!(!text.contains("not reached\n"), "{text}");
    }
}
