//! Benchmarks against a peer VMM, Firecracker, on the same guest kernel, in one run where
//! the tests run (the nested test bed here), alternating run by run so that both see the
//! same machine: `peer_boot` ([`boot`]) and `peer_restore` ([`restore`]).
//!
//! The Firecracker binary: `$KILN_PEER_FIRECRACKER`, else `../shared/peers/firecracker`
//! beside the checkout; without one the benchmarks are reported as skipped.

mod boot;
mod restore;
pub mod uds_http;

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::{json, Value};

pub use boot::boot;
pub use restore::restore;

/// The command line both VMMs give the guest: kiln's default.
pub const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1 io_delay=none quiet";
/// The environment variable naming a Firecracker binary.
pub const FIRECRACKER_ENV: &str = "KILN_PEER_FIRECRACKER";

/// The Firecracker binary to measure against, if there is one.
pub fn firecracker() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(FIRECRACKER_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let beside = kiln_tests::kernels::repo_root().join("../shared/peers/firecracker");
    beside.canonicalize().ok().filter(|p| p.is_file())
}

/// The result line of a benchmark that found no Firecracker binary.
fn skipped(bench: &str) -> Value {
    json!({
        "bench": bench,
        "skipped": format!(
            "no Firecracker binary (${FIRECRACKER_ENV}, or ../shared/peers/firecracker beside the checkout)"
        ),
    })
}

/// The Firecracker binary as a test-bed file, `$FILES/firecracker`.
fn firecracker_file(path: &std::path::Path) -> Result<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(("firecracker".to_string(), bytes))
}

/// `a / b`, to three decimals.
fn ratio(a: f64, b: f64) -> f64 {
    (a / b * 1000.0).round() / 1000.0
}
