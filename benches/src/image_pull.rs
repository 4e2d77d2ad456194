//! `image_pull`: `kiln image pull` of an image of about 50 MiB (a busybox layer and a layer
//! of incompressible data) from Debian's `docker-registry` on loopback into an empty store,
//! to a bootable ext4 image: manifest, config and layers fetched and checked, layers
//! applied, the agent installed, the filesystem packed. Timed from outside, on this
//! machine (direct path; a pull needs no `/dev/kvm`). Needs root, as `kiln image pull`.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use kiln_tests::artifacts::StaticBinaries;
use kiln_tests::registry::{self, Registry};
use kiln_tests::tmp::TempDir;
use serde_json::{Map, Value};

use crate::stats;

/// The data layer's size: with busybox and the agent, an image of about 50 MiB.
const DATA_MIB: usize = 48;

pub fn run(bins: &StaticBinaries, runs: usize) -> Result<Vec<Value>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(vec![serde_json::json!({
            "bench": "image_pull",
            "path": "direct",
            "skipped": "kiln image pull needs root",
        })]);
    }
    let tmp = TempDir::new("bench-image-pull")?;
    let (base, data) = layers(tmp.path())?;
    let reg_dir = tmp.path().join("registry");
    std::fs::create_dir_all(&reg_dir)?;
    let registry = Registry::start(&reg_dir)?;
    let layer_bytes = base.len() + data.len();
    registry.push("bench/big", "1", &[base, data], serde_json::json!({}))?;
    let reference = format!("{}/bench/big:1", registry.host());
    let mut ms = Vec::new();
    let mut pull_secs = Vec::new();
    for i in 0..runs {
        let store = tmp.path().join(format!("store-{i}"));
        let start = Instant::now();
        let out = Command::new(&bins.kiln)
            .args(["image", "pull", &reference, "--name", "big", "--json"])
            .arg("--store")
            .arg(&store)
            .arg("--agent")
            .arg(&bins.kiln_agent)
            .args(["--insecure-registry", &registry.host()])
            .env_remove("DOCKER_AUTH_CONFIG")
            .env("DOCKER_CONFIG", tmp.path())
            .output()
            .context("running kiln image pull")?;
        ms.push(start.elapsed().as_secs_f64() * 1000.0);
        ensure!(
            out.status.success(),
            "kiln image pull failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: Value = serde_json::from_slice(&out.stdout).context("pull's JSON line")?;
        ensure!(json["fetched"] == true, "nothing was fetched: {json}");
        if let Some(s) = json["pull_secs"].as_f64() {
            pull_secs.push(s);
        }
        std::fs::remove_dir_all(&store)?;
    }
    let mut extra = Map::new();
    extra.insert(
        "what".into(),
        "kiln image pull from a loopback registry into an empty store, to a bootable ext4".into(),
    );
    extra.insert(
        "layer_mib".into(),
        ((layer_bytes as f64 / f64::from(1u32 << 20) * 10.0).round() / 10.0).into(),
    );
    if !pull_secs.is_empty() {
        extra.insert(
            "median_pull_secs".into(),
            stats::summary(&pull_secs).0.into(),
        );
    }
    Ok(vec![stats::result(
        "image_pull",
        "direct",
        "ms",
        &ms,
        extra,
    )])
}

/// A busybox root, and `DATA_MIB` MiB of bytes no compressor shrinks (xorshift).
fn layers(dir: &Path) -> Result<(Vec<u8>, Vec<u8>)> {
    let bb = kiln_tests::busybox::busybox()?;
    let base = dir.join("base");
    std::fs::create_dir_all(base.join("bin"))?;
    std::fs::write(base.join("bin/busybox"), &bb.binary)?;
    for applet in &bb.applets {
        std::os::unix::fs::symlink("busybox", base.join("bin").join(applet))?;
    }
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("srv"))?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut bytes = Vec::with_capacity(DATA_MIB << 20);
    while bytes.len() < DATA_MIB << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(data.join("srv/data.bin"), &bytes)?;
    Ok((registry::layer(&base, 0, 0)?, registry::layer(&data, 0, 0)?))
}
