//! `net`: host-to-guest TCP throughput over a TAP: the guest `wget`s a file of N MiB from
//! busybox `httpd` on the test-bed host's side of a TAP that `kiln net setup` made, a few
//! times in one VM (`kiln run --net`), through `kiln exec`. The script is the one the
//! `net_guest_downloads_from_host_over_tap` test runs (`kiln_tests::net_download`).
//!
//! The figure is the guest's own time around `wget` (its /proc/uptime, 10 ms resolution,
//! downloads take seconds): the exec's set-up and the guest's sha256sum of what it got
//! (which checks every run byte for byte against the served file) are left out. The host's
//! time around the whole exec is reported as `host_median_mib_s`.

use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::net_download;
use kiln_tests::Runner;
use serde_json::{Map, Value};

use crate::stats;
use crate::vsock::{agent_files, run_script, CLOCK_SH};

/// What to measure.
pub struct Params {
    /// Downloads to time.
    pub runs: usize,
    /// MiB per download.
    pub mib: u64,
}

pub fn run(runner: &Runner, p: &Params) -> Result<Vec<Value>> {
    ensure!(p.mib > 0 && p.runs > 0, "nothing to measure");
    let script = format!("{CLOCK_SH}{}", net_download::script(p.mib, p.runs));
    let mut files = agent_files()?;
    let script = net_download::isolated(&script, &mut files);
    let timeout = Duration::from_secs(300 + 30 * p.mib * p.runs as u64);
    let (out, clock) = run_script(runner, "net", &script, &files, timeout)?;
    let (host_sha, runs) = net_download::parse(&out.console);
    ensure!(
        runs.len() == p.runs,
        "expected {} downloads:\n{}",
        p.runs,
        out.console
    );
    let mib = p.mib as f64;
    let mut guest = Vec::new();
    let mut host = Vec::new();
    for r in &runs {
        ensure!(
            Some(&r.sha) == host_sha.as_ref(),
            "a download differs from the served file:\n{}",
            out.console
        );
        ensure!(
            r.guest_s > 0.0 && r.host_us > 0.0,
            "a download took no time"
        );
        guest.push(mib / r.guest_s);
        host.push(mib / (r.host_us / 1e6));
    }
    let mut extra = Map::new();
    extra.insert("bytes".into(), (p.mib << 20).into());
    extra.insert(
        "what".into(),
        format!(
            "guest wget of {} MiB from busybox httpd on the host's TAP address, guest time \
             around wget",
            p.mib
        )
        .into(),
    );
    let (host_median, _, _) = stats::summary(&host);
    extra.insert(
        "host_median_mib_s".into(),
        ((host_median * 1000.0).round() / 1000.0).into(),
    );
    extra.insert(
        "guest".into(),
        "guest vmlinux + agent initramfs, 1 vCPU, 256 MiB, virtio-net on a TAP".into(),
    );
    extra.insert("clock".into(), clock.into());
    Ok(vec![stats::result(
        "net",
        runner.path_name(),
        "mib_s",
        &guest,
        extra,
    )])
}
