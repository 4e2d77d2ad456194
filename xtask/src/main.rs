//! `cargo xtask …`: the project's entry points for set-up, the demo, the tests, the
//! benchmarks and fuzzing. Run from anywhere in the checkout; paths are taken from the repo root.

mod bench;
mod budgets;
mod demo;
mod dist;
mod docs;
mod fuzz;
mod report;
mod setup;
mod soak;
mod words;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "kiln's set-up, demo, test and bench tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the Debian packages (as root) and build the guest and test-bed kernels.
    /// Idempotent: a second run only checks.
    Setup,
    /// Boot a microVM and run a sample CI job in it (direct /dev/kvm if the CPU has
    /// hardware virtualization, else inside the nested QEMU test bed).
    Demo,
    /// Set up, then cargo fmt --check, clippy -D warnings, every test of the workspace and
    /// every fuzz target for --fuzz-time seconds (CI runs all of it).
    Test {
        /// Skip the fuzz step (for quick local runs; CI never passes it).
        #[arg(long)]
        no_fuzz: bool,
        /// Seconds to fuzz each target in the fuzz step.
        #[arg(long, default_value_t = fuzz::CI_SECS)]
        fuzz_time: u64,
    },
    /// Run the benchmarks (release build); prints one JSON object per line, writes them
    /// all to target/bench.json and prints a table; `--check` holds them to
    /// benches/budgets.toml; `--report` writes docs/performance.md from a results file.
    Bench(bench::BenchArgs),
    /// Build and run the cargo-fuzz targets in fuzz/ (each for --time seconds, on a scratch
    /// copy of its seed corpus); fails on any crash. Installs cargo-fuzz if missing.
    Fuzz {
        /// Seconds to fuzz each target.
        #[arg(long, default_value_t = fuzz::CI_SECS)]
        time: u64,
        /// Run only this target (default: all of them).
        #[arg(long)]
        target: Option<String>,
    },
    /// Run `--jobs` sequential `kiln job`s, then `--concurrent` VMs at once (in the test
    /// bed unless the CPU has hardware virtualization), and check that host fds, threads,
    /// processes, sockets, network devices, cgroups and memory come back; prints figures.
    Soak(soak::SoakArgs),
    /// Check that the docs hold: links in README.md and docs/ resolve, every kiln,
    /// kiln-gitlab and cargo xtask command line in README.md has the subcommands and flags
    /// it shows (builds kiln's static binaries to ask their --help), and no tracked file
    /// tells how kiln was made ("session N", "issue N", remarks on machine load). Prints
    /// each problem; xtask's tests make the same checks.
    DocsCheck,
    /// Build kiln's Debian package, target/dist/kiln_VERSION_amd64.deb: the static
    /// binaries, the guest kernel and agent initramfs, systemd units, manual pages and
    /// completions (see docs/install.md). `--lintian` checks it.
    Dist(dist::DistArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Demo => demo::run(),
        Task::Test { no_fuzz, fuzz_time } => test(!no_fuzz, fuzz_time),
        Task::Bench(args) => bench::run(&args),
        Task::Fuzz { time, target } => fuzz::run(time, target.as_deref()),
        Task::Soak(args) => soak::run(&args),
        Task::DocsCheck => docs_check(),
        Task::Dist(args) => dist::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn repo_root() -> PathBuf {
    kiln_tests::kernels::repo_root()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(repo_root());
    cmd
}

/// `fuzz_s`: seconds per fuzz target, after the tests (`fuzz` false skips that step).
fn test(fuzz: bool, fuzz_s: u64) -> Result<()> {
    step("setup", setup::run)?;
    let steps: [(&str, &[&str]); 3] = [
        ("cargo fmt", &["fmt", "--all", "--check"]),
        (
            "cargo clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        ("cargo test", &["test", "--workspace"]),
    ];
    // Test-bed runs rebooted because the test-bed host's own kernel panicked are listed
    // here and printed after the tests, pass or fail.
    let incidents = repo_root().join("target/testbed-incidents.log");
    let _ = std::fs::remove_file(&incidents);
    for (name, args) in steps {
        step(name, || {
            let status = cargo()
                .args(args)
                .env(kiln_tests::INCIDENT_LOG_ENV, &incidents)
                .status()
                .with_context(|| format!("could not run cargo {}", args.join(" ")))?;
            print_incidents(&incidents);
            if !status.success() {
                bail!("`cargo {}` exited with {status}", args.join(" "));
            }
            Ok(())
        })?;
    }
    // After the tests: a crash found here is a bug in code the tests already passed, and
    // the fuzz build (AddressSanitizer, its own target dir) does not slow them down.
    if fuzz {
        step("cargo fuzz", || fuzz::run(fuzz_s, None))?;
    } else {
        println!("xtask test: fuzz step skipped (--no-fuzz)");
    }
    println!("xtask test: all steps passed");
    Ok(())
}

/// `cargo xtask docs-check`: the link and wording checks, every finding printed.
fn docs_check() -> Result<()> {
    let root = repo_root();
    let mut problems = Vec::new();
    for file in docs::markdown_files(&root)? {
        problems.extend(docs::broken_links(&root, &file)?);
    }
    let readme = std::fs::read_to_string(root.join("README.md")).context("reading README.md")?;
    let bins = kiln_tests::artifacts::static_binaries()?;
    let helps = docs::Binaries {
        kiln: bins.kiln,
        kiln_gitlab: bins.kiln_gitlab,
    };
    for shown in docs::shown_commands(&readme) {
        problems.extend(docs::check_command(&shown, &helps)?);
    }
    problems.extend(words::scan_repo(&root)?.iter().map(ToString::to_string));
    for p in &problems {
        println!("{p}");
    }
    if !problems.is_empty() {
        bail!(
            "{} problem(s) in the docs and tracked files",
            problems.len()
        );
    }
    println!("xtask docs-check: links resolve, no development-log wording");
    Ok(())
}

/// Prints the test-bed incidents recorded so far, if any.
fn print_incidents(log: &Path) {
    if let Ok(text) = std::fs::read_to_string(log) {
        let n = text.lines().count();
        println!("xtask test: {n} test-bed run(s) booted again after the test-bed host panicked:");
        for line in text.lines() {
            println!("xtask test:   {line}");
        }
    }
}

/// Runs one step of `cargo xtask test` and says how long it took (CI logs show where the
/// suite's time goes).
fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    println!("xtask test: == {name} ==");
    let start = std::time::Instant::now();
    let result = f().with_context(|| format!("step `{name}` failed"));
    println!(
        "xtask test: {name} took {:.0} s",
        start.elapsed().as_secs_f64()
    );
    result
}
