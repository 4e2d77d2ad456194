//! `cargo xtask bench`: run the benchmarks (release build of `kiln-benches`), keep their
//! JSON lines in `target/bench.json`, print them as a table, and with `--check` hold them
//! to `benches/budgets.toml`; with `--report`, write `docs/performance.md` from a results
//! file (see report.rs).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;

use crate::budgets::{self, Budgets};
use crate::{cargo, repo_root, report, setup};

#[derive(Args)]
pub struct BenchArgs {
    /// Only benchmarks whose name contains this (comma-separated: any of these).
    filter: Option<String>,
    /// Check the results against benches/budgets.toml; fail if one is over budget.
    #[arg(long)]
    check: bool,
    /// Do not run the benchmarks: take the results from this file (JSON lines).
    #[arg(long, value_name = "FILE", visible_alias = "from")]
    results: Option<PathBuf>,
    /// Do not run the benchmarks: write docs/performance.md (or --out) from
    /// target/bench.json (or --from FILE), with the run's commit, date, host and the budgets.
    #[arg(long)]
    report: bool,
    /// Where --report writes the page.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "docs/performance.md",
        requires = "report"
    )]
    out: PathBuf,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let root = repo_root();
    let results_path = match &args.results {
        Some(path) => Some(path.clone()),
        None if args.report => Some(target_dir().join("bench.json")),
        None => None,
    };
    let results = match &results_path {
        Some(path) => budgets::read_results(path)?,
        None => run_benches(args.filter.as_deref())?,
    };
    print_table(&results);
    if let (true, Some(from)) = (args.report, &results_path) {
        report::write(&root, from, &root.join(&args.out))?;
    }
    if args.check {
        let path = repo_root().join("benches/budgets.toml");
        let verdicts = Budgets::load(&path)?.check(&results);
        println!();
        if !budgets::report(&verdicts) {
            bail!(
                "over budget (see the table above; budgets in {})",
                path.display()
            );
        }
        println!("xtask bench: every budget holds");
    }
    Ok(())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

fn run_benches(filter: Option<&str>) -> Result<Vec<Value>> {
    setup::run()?;
    let target = target_dir();
    std::fs::create_dir_all(&target)
        .with_context(|| format!("could not create {}", target.display()))?;
    let out_path = target.join("bench.json");
    let mut out = std::fs::File::create(&out_path)
        .with_context(|| format!("could not create {}", out_path.display()))?;
    // Where and when this run measured, for `--report` (and whoever reads the file later).
    writeln!(out, "{}", report::RunInfo::here(&repo_root()).to_line())
        .with_context(|| format!("writing {}", out_path.display()))?;

    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "--release", "-p", "kiln-benches", "--"]);
    cmd.args(filter);
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("could not run the kiln-benches binary")?;
    let stdout = child.stdout.take().context("bench stdout not captured")?;
    let mut results = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading the benchmarks' output")?;
        println!("{line}");
        if let Ok(value @ Value::Object(_)) = serde_json::from_str::<Value>(&line) {
            writeln!(out, "{line}").with_context(|| format!("writing {}", out_path.display()))?;
            results.push(value);
        }
    }
    let status = child.wait().context("waiting for kiln-benches")?;
    eprintln!(
        "xtask bench: {} results in {}",
        results.len(),
        out_path.display()
    );
    if !status.success() {
        bail!("kiln-benches exited with {status}; the results printed so far are kept");
    }
    Ok(results)
}

/// One row per result: its median, min and max in the unit its fields name.
fn print_table(results: &[Value]) {
    println!();
    println!(
        "{:<22} {:<8} {:>5} {:>12} {:>12} {:>12}  unit",
        "bench", "path", "runs", "median", "min", "max"
    );
    for r in results {
        // The `{"run": …}` line describes the run, not a result.
        let (Some(fields), Some(_)) = (r.as_object(), r.get("bench")) else {
            continue;
        };
        if let Some(why) = r["skipped"].as_str() {
            println!("{:<22} skipped: {why}", r["bench"].as_str().unwrap_or("?"));
            continue;
        }
        // The unit is the one with all three of median_, min_ and max_ (other median_
        // fields are extras, like empty_job's median_boot_ms).
        let unit = fields
            .keys()
            .filter_map(|k| k.strip_prefix("median_"))
            .find(|u| {
                fields.contains_key(&format!("min_{u}")) && fields.contains_key(&format!("max_{u}"))
            })
            .unwrap_or("?");
        // Results that share a name say what they measured in `direction` or `root`.
        let name = r["bench"].as_str().unwrap_or("?");
        let label = match ["direction", "root"].iter().find_map(|k| r[*k].as_str()) {
            Some(variant) => format!("{name} ({variant})"),
            None => name.to_string(),
        };
        let num = |key: &str| {
            fields
                .get(&format!("{key}_{unit}"))
                .and_then(Value::as_f64)
                .map_or_else(|| "-".to_string(), |v| format!("{v:.3}"))
        };
        println!(
            "{:<22} {:<8} {:>5} {:>12} {:>12} {:>12}  {unit}",
            label,
            r["path"].as_str().unwrap_or("?"),
            r["runs"]
                .as_u64()
                .map_or_else(|| "-".into(), |n| n.to_string()),
            num("median"),
            num("min"),
            num("max"),
        );
    }
}
