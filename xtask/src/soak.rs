//! `cargo xtask soak`: the full soak (`kiln_tests::soak`): sequential `kiln job`s, then VMs
//! at once, in the test bed (or directly on hardware virtualization). Prints the figures as
//! one JSON line and a table, and fails on a failed job or VM or on any leak.

use anyhow::{bail, Result};
use kiln_tests::soak::{self, Soak};
use kiln_tests::Runner;

#[derive(clap::Args)]
pub struct SoakArgs {
    /// Sequential `kiln job`s.
    #[arg(long, default_value_t = 300)]
    jobs: u32,
    /// VMs running at once afterwards, each in its own cgroup slot.
    #[arg(long, default_value_t = 16)]
    concurrent: u32,
}

pub fn run(args: &SoakArgs) -> Result<()> {
    let runner = Runner::detect()?;
    println!(
        "xtask soak: {} jobs, then {} VMs at once ({})",
        args.jobs,
        args.concurrent,
        runner.describe()
    );
    let report = soak::run(
        &runner,
        Soak {
            jobs: args.jobs,
            concurrent: args.concurrent,
        },
    )?;
    println!("{}", report.json());
    print!("{}", report.table());
    let mut problems = report.leaks();
    if report.jobs_ok != args.jobs {
        problems.push(format!(
            "{} of {} jobs failed",
            args.jobs - report.jobs_ok,
            args.jobs
        ));
    }
    if report.concurrent_ok != args.concurrent {
        problems.push(format!(
            "{} of {} concurrent VMs never answered",
            args.concurrent - report.concurrent_ok,
            args.concurrent
        ));
    }
    if !problems.is_empty() {
        eprintln!("--- the end of the soak's output ---\n{}", report.tail);
        bail!("soak failed: {}", problems.join("; "));
    }
    println!("xtask soak: no leaks");
    Ok(())
}
