//! `cargo xtask fuzz`: build and run the cargo-fuzz (libFuzzer) targets in `fuzz/`, each for
//! a fixed time, on a scratch copy of its committed seed corpus (`target/fuzz/<target>/`;
//! the committed corpus never grows). Installs cargo-fuzz if it is missing. A crash, leak,
//! timeout or out-of-memory fails the task, naming the target and the input that did it.
//!
//! cargo-fuzz needs nightly-only rustc flags; the stable toolchain takes them with
//! `RUSTC_BOOTSTRAP=1`, which this task sets for cargo fuzz only.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::{cargo, repo_root};

/// Seconds per target in `cargo xtask test`: CI's minimum, enough to replay the
/// seed corpus and explore a little; longer runs are `cargo xtask fuzz --time S`.
pub const CI_SECS: u64 = 30;
/// Per-target libFuzzer limits besides the time.
const RSS_LIMIT_MB: u32 = 2048;
/// One input taking longer than this is a hang.
const INPUT_TIMEOUT_S: u32 = 60;

/// `time_s`: seconds per target; `only`: one target by name, else all of them.
pub fn run(time_s: u64, only: Option<&str>) -> Result<()> {
    ensure_cargo_fuzz()?;
    let fuzz_dir = repo_root().join("fuzz");
    let all = list_targets(&fuzz_dir)?;
    let targets: Vec<String> = match only {
        Some(name) if all.iter().any(|t| t == name) => vec![name.to_string()],
        Some(name) => bail!(
            "no fuzz target `{name}`; the targets are: {}",
            all.join(", ")
        ),
        None => all,
    };
    // One build for all of them: cargo shares the instrumented dependencies and compiles
    // in parallel, where a build per target would go one at a time.
    let build_dir = fuzz_dir.join("target");
    let build_start = Instant::now();
    build(&fuzz_dir, &build_dir, only)?;
    println!(
        "fuzz: built {} target(s) in {:.0} s",
        targets.len(),
        build_start.elapsed().as_secs_f64()
    );
    let binaries = build_dir.join(host_triple()?).join("release");
    let mut failed = Vec::new();
    for target in &targets {
        match run_target(&fuzz_dir, &binaries.join(target), target, time_s) {
            Ok(stats) => println!("{stats}"),
            Err(err) => {
                println!("fuzz {target}: FAILED: {err:#}");
                failed.push(target.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!("fuzz target(s) failed: {}", failed.join(", "));
    }
    println!("xtask fuzz: {} target(s), no crashes", targets.len());
    Ok(())
}

/// `cargo fuzz …` in `fuzz/`, with the nightly flags allowed on stable.
fn cargo_fuzz(fuzz_dir: &Path) -> Command {
    let mut cmd = cargo();
    cmd.current_dir(fuzz_dir)
        .env("RUSTC_BOOTSTRAP", "1")
        .arg("fuzz");
    cmd
}

fn ensure_cargo_fuzz() -> Result<()> {
    let present = cargo()
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask fuzz: cargo-fuzz is missing; installing it (cargo install cargo-fuzz)");
    let status = cargo()
        .args(["install", "--locked", "cargo-fuzz"])
        .status()
        .context("could not run cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("`cargo install --locked cargo-fuzz` exited with {status}");
    }
    Ok(())
}

fn list_targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let out = cargo_fuzz(fuzz_dir)
        .arg("list")
        .output()
        .context("could not run cargo fuzz list")?;
    if !out.status.success() {
        bail!(
            "`cargo fuzz list` exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let targets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if targets.is_empty() {
        bail!("cargo fuzz list found no targets in {}", fuzz_dir.display());
    }
    Ok(targets)
}

/// What one run measured (libFuzzer's `-print_final_stats`).
struct Stats {
    target: String,
    execs: u64,
    secs: f64,
    seeds: usize,
    corpus: usize,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = if self.secs > 0.0 {
            self.execs as f64 / self.secs
        } else {
            0.0
        };
        write!(
            f,
            "fuzz {}: {} execs in {:.0} s ({rate:.0}/s), corpus {} -> {} inputs, no crashes",
            self.target, self.execs, self.secs, self.seeds, self.corpus
        )
    }
}

/// `cargo fuzz build` of `only`, else of every target, into `build_dir` (explicit, so that
/// the binaries are where we look whatever CARGO_TARGET_DIR says).
fn build(fuzz_dir: &Path, build_dir: &Path, only: Option<&str>) -> Result<()> {
    let mut cmd = cargo_fuzz(fuzz_dir);
    cmd.arg("build");
    cmd.args(only);
    let status = cmd
        .arg("--target-dir")
        .arg(build_dir)
        .status()
        .context("could not run cargo fuzz build")?;
    if !status.success() {
        bail!("`cargo fuzz build` exited with {status}");
    }
    Ok(())
}

fn run_target(fuzz_dir: &Path, binary: &Path, target: &str, time_s: u64) -> Result<Stats> {
    let scratch = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("fuzz")
        .join(target);
    let corpus = scratch.join("corpus");
    let artifacts = scratch.join("artifacts");
    for dir in [&corpus, &artifacts] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let seeds = copy_seeds(&fuzz_dir.join("corpus").join(target), &corpus)?;
    let log_path = scratch.join("fuzz.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;

    println!(
        "fuzz {target}: running for {time_s} s (log: {})",
        log_path.display()
    );
    let start = Instant::now();
    let status = Command::new(binary)
        .arg(&corpus)
        .arg(format!("-max_total_time={time_s}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .stdout(log.try_clone().context("duplicating the log file")?)
        .stderr(log)
        .status()
        .with_context(|| format!("could not run {}", binary.display()))?;
    let secs = start.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();

    // libFuzzer also writes `slow-unit-*` files there; those are not failures.
    let found: Vec<PathBuf> = std::fs::read_dir(&artifacts)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_failure_artifact(p))
                .collect()
        })
        .unwrap_or_default();
    if !status.success() || !found.is_empty() {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        eprintln!("--- last lines of {} ---", log_path.display());
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
        let files: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "{target} exited with {status}; crash input(s): {} (reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run {target} <file>)",
            if files.is_empty() {
                "none written".to_string()
            } else {
                files.join(", ")
            }
        );
    }
    let execs = stat(&text, "stat::number_of_executed_units").unwrap_or(0);
    let corpus_len = std::fs::read_dir(&corpus).map_or(0, Iterator::count);
    Ok(Stats {
        target: target.to_string(),
        execs,
        secs,
        seeds,
        corpus: corpus_len,
    })
}

/// Whether libFuzzer wrote `path` for a failure (crash, leak, timeout, out of memory).
fn is_failure_artifact(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
        ["crash-", "leak-", "timeout-", "oom-"]
            .iter()
            .any(|p| n.starts_with(p))
    })
}

/// Copies the committed seeds into the scratch corpus; returns how many there were.
fn copy_seeds(from: &Path, to: &Path) -> Result<usize> {
    let Ok(entries) = std::fs::read_dir(from) else {
        return Ok(0);
    };
    let mut n = 0;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", from.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::copy(entry.path(), to.join(entry.file_name()))
                .with_context(|| format!("copying {}", entry.path().display()))?;
            n += 1;
        }
    }
    Ok(n)
}

/// A `stat::name: value` line of libFuzzer's final stats.
fn stat(log: &str, name: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        l.strip_prefix(name)?
            .trim_start_matches(':')
            .trim()
            .parse()
            .ok()
    })
}

/// The host's target triple (cargo fuzz builds for it explicitly).
fn host_triple() -> Result<String> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(rustc)
        .arg("-vV")
        .output()
        .context("could not run rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|h| h.trim().to_string())
        .context("rustc -vV printed no host triple")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_stats_are_parsed() {
        let log = "#1234 DONE cov: 10\nstat::number_of_executed_units: 98765\nstat::average_exec_per_sec:  3292\n";
        assert_eq!(stat(log, "stat::number_of_executed_units"), Some(98765));
        assert_eq!(stat(log, "stat::average_exec_per_sec"), Some(3292));
        assert_eq!(stat(log, "stat::new_units_added"), None);
    }

    #[test]
    fn slow_units_are_not_failures() {
        assert!(is_failure_artifact(Path::new("t/crash-0a1b")));
        assert!(is_failure_artifact(Path::new("oom-ff")));
        assert!(is_failure_artifact(Path::new("timeout-12")));
        assert!(!is_failure_artifact(Path::new("t/slow-unit-0a1b")));
    }
}
