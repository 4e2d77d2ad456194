//! `cargo xtask …`: the project's entry points for set-up, the demo, the tests, the
//! benchmarks and fuzzing. Run from anywhere in the checkout; paths are taken from the repo root.

mod bench;
mod budgets;
mod demo;
mod fuzz;
mod setup;

use std::path::PathBuf;
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
    /// Set up, then cargo fmt --check, clippy -D warnings and every test of the workspace.
    Test,
    /// Run the benchmarks (release build); prints one JSON object per line, writes them
    /// all to target/bench.json and prints a table; `--check` holds them to
    /// benches/budgets.toml.
    Bench(bench::BenchArgs),
    /// Build and run the cargo-fuzz targets in fuzz/ (each for --time seconds, on a scratch
    /// copy of its seed corpus); fails on any crash. Installs cargo-fuzz if missing.
    Fuzz {
        /// Seconds to fuzz each target.
        #[arg(long, default_value_t = 30)]
        time: u64,
        /// Run only this target (default: all of them).
        #[arg(long)]
        target: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Demo => demo::run(),
        Task::Test => test(),
        Task::Bench(args) => bench::run(&args),
        Task::Fuzz { time, target } => fuzz::run(time, target.as_deref()),
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

fn test() -> Result<()> {
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
    for (name, args) in steps {
        step(name, || {
            let status = cargo()
                .args(args)
                .status()
                .with_context(|| format!("could not run cargo {}", args.join(" ")))?;
            if !status.success() {
                bail!("`cargo {}` exited with {status}", args.join(" "));
            }
            Ok(())
        })?;
    }
    println!("xtask test: all steps passed");
    Ok(())
}

fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    println!("xtask test: == {name} ==");
    f().with_context(|| format!("step `{name}` failed"))
}
