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
use serde_json::{json, Map, Value};

use crate::stats;

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

/// The fields both peer benchmarks report about the peer: which binary, its median and
/// runs, and `ratio`, kiln's median over the peer's (to three decimals).
fn peer_fields(binary: &std::path::Path, kiln: &[f64], peer: &[f64]) -> Map<String, Value> {
    let (kiln_median, peer_median) = (stats::summary(kiln).0, stats::summary(peer).0);
    let mut extra = Map::new();
    extra.insert("peer".into(), "firecracker".into());
    extra.insert("peer_binary".into(), binary.display().to_string().into());
    extra.insert("peer_median_ms".into(), peer_median.into());
    extra.insert("peer_runs".into(), peer.len().into());
    extra.insert(
        "ratio".into(),
        ((kiln_median / peer_median * 1000.0).round() / 1000.0).into(),
    );
    extra
}
