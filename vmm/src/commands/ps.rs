//! `kiln ps`: the VMs kiln runs on this host with a control API (see [`crate::registry`]).

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::cli::PsArgs;
use crate::registry::{self, VmRecord};

pub fn ps(args: &PsArgs) -> anyhow::Result<ExitCode> {
    let vms = match registry::dir() {
        Some(dir) => registry::list(&dir),
        None => Vec::new(),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if args.json {
        let rows: Vec<serde_json::Value> = vms
            .iter()
            .map(|vm| {
                let mut row = serde_json::to_value(vm).unwrap_or_default();
                row["uptime_s"] = now.saturating_sub(vm.started_unix).into();
                row
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>8}  {:>9}  {:>5}  {:>8}  {:<40}  {:<40}  FROM",
        "PID", "UPTIME", "VCPUS", "MEMORY", "API", "VSOCK"
    );
    for vm in &vms {
        println!("{}", row(vm, now));
    }
    Ok(ExitCode::SUCCESS)
}

fn row(vm: &VmRecord, now: u64) -> String {
    let path = |p: Option<&std::path::Path>| p.map_or("-".into(), |p| p.display().to_string());
    format!(
        "{:>8}  {:>9}  {:>5}  {:>5}MiB  {:<40}  {:<40}  {}",
        vm.pid,
        uptime(now.saturating_sub(vm.started_unix)),
        vm.vcpus,
        vm.memory_mib,
        vm.api.display(),
        path(vm.vsock.as_deref()),
        path(vm.snapshot.as_deref()),
    )
}

/// `42s`, `3m05s`, `2h01m`, `3d04h`.
fn uptime(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptimes_read_like_ps() {
        assert_eq!(uptime(42), "42s");
        assert_eq!(uptime(185), "3m05s");
        assert_eq!(uptime(7260), "2h01m");
        assert_eq!(uptime(3 * 86400 + 4 * 3600), "3d04h");
    }
}
