//! `cargo xtask dist`: kiln's Debian package (`kiln_dist::build`), optionally checked with
//! lintian.

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct DistArgs {
    /// Where the package goes. Default: target/dist.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Check the package with lintian (Debian package `lintian`) and fail on its errors.
    #[arg(long)]
    lintian: bool,
}

pub fn run(args: &DistArgs) -> Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| crate::repo_root().join("target/dist"));
    let package = kiln_dist::build(&out)?;
    let size = std::fs::metadata(&package.deb)
        .with_context(|| format!("{}", package.deb.display()))?
        .len();
    println!(
        "xtask dist: {} ({:.1} MiB); install it with `apt install {}`",
        package.deb.display(),
        size as f64 / (1024.0 * 1024.0),
        package.deb.display()
    );
    if args.lintian {
        print!("{}", kiln_dist::lintian(&package.deb)?);
        println!("xtask dist: lintian: no errors");
    }
    Ok(())
}
