//! The guest kernel's own figures.
//!
//! - `guest_kernel`: the size of the kernel kiln boots (vmlinux, what `kiln run` loads, and
//!   bzImage) and how many options its config builds in. Every option a CI job needs is
//!   built in (no modules), so this is what the guest carries.
//! - `kernel_change`: `boot` with this checkout's guest kernel against the one built from
//!   another revision's `kernel-config/guest.config`, alternating in one test-bed run, so a
//!   change of the config is measured by what it costs the boot and not by how busy the
//!   host was. Runs only when given a base revision (`--base-kernel REV` or
//!   `$KILN_BENCH_BASE_KERNEL`); otherwise reported as skipped.

use anyhow::{Context, Result};
use kiln_tests::kernels::KernelImages;
use kiln_tests::Runner;
use serde_json::{json, Map, Value};

use crate::boot;
use crate::stats;
use crate::timeline::{self, GuestTimeline};

const MIB: f64 = 1024.0 * 1024.0;

pub fn size() -> Result<Vec<Value>> {
    let guest = kiln_tests::kernels::guest()?;
    let mib = |path: &std::path::Path| -> Result<f64> {
        let len = std::fs::metadata(path)
            .with_context(|| format!("cannot stat {}", path.display()))?
            .len();
        Ok((len as f64 / MIB * 100.0).round() / 100.0)
    };
    let vmlinux = mib(&guest.vmlinux)?;
    let mut extra = Map::new();
    extra.insert("bzimage_mib".into(), mib(&guest.bzimage)?.into());
    extra.insert("options_y".into(), built_in_options(&guest)?.into());
    Ok(vec![stats::result(
        "guest_kernel",
        "build",
        "mib",
        &[vmlinux],
        extra,
    )])
}

/// The `n` initcalls that take the most longer in `new` than in `old` (absent: 0 ms).
fn initcall_growth(new: &GuestTimeline, old: &GuestTimeline, n: usize) -> Vec<(String, f64)> {
    let before: std::collections::HashMap<String, f64> = old.top(usize::MAX).into_iter().collect();
    let mut grown: Vec<(String, f64)> = new
        .top(usize::MAX)
        .into_iter()
        .map(|(name, ms)| {
            let delta = ms - before.get(&name).copied().unwrap_or(0.0);
            (name, (delta * 1000.0).round() / 1000.0)
        })
        .filter(|(_, delta)| *delta > 0.0)
        .collect();
    grown.sort_by(|a, b| b.1.total_cmp(&a.1));
    grown.truncate(n);
    grown
}

/// The `CONFIG_…=y` lines of the kernel's final config.
fn built_in_options(kernel: &KernelImages) -> Result<usize> {
    let config = kernel.dir.join("config");
    let text = std::fs::read_to_string(&config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    Ok(text.lines().filter(|l| l.ends_with("=y")).count())
}

/// One `initcall_debug` boot of each kernel: where the difference goes, into `extra`.
fn timelines(
    runner: &Runner,
    current: &KernelImages,
    base: &KernelImages,
    rev: &str,
    extra: &mut Map<String, Value>,
) -> Result<()> {
    let (_, new_timeline) = timeline::boot(runner, &current.vmlinux, None)?;
    let (_, old_timeline) = timeline::boot(runner, &base.vmlinux, Some("base-vmlinux"))?;
    let added = initcall_growth(&new_timeline, &old_timeline, 12);
    eprintln!("kernel_change: this kernel against {rev}'s, one boot each with initcall_debug:");
    for (what, new, old) in [
        (
            "kernel to init (printk ms)",
            new_timeline.init_ms,
            old_timeline.init_ms,
        ),
        (
            "all initcalls (ms)",
            Some(new_timeline.initcalls_total_ms()),
            Some(old_timeline.initcalls_total_ms()),
        ),
    ] {
        eprintln!(
            "  {what:<28} {:>9.3}  base {:>9.3}",
            new.unwrap_or(f64::NAN),
            old.unwrap_or(f64::NAN)
        );
    }
    eprintln!("  initcalls that grew or are new (ms more than the base):");
    for (name, ms) in &added {
        eprintln!("    {ms:>9.3}  {name}");
    }
    extra.insert("kernel_to_init_ms".into(), json!(new_timeline.init_ms));
    extra.insert("base_kernel_to_init_ms".into(), json!(old_timeline.init_ms));
    extra.insert(
        "initcalls_total_ms".into(),
        json!(new_timeline.initcalls_total_ms()),
    );
    extra.insert(
        "base_initcalls_total_ms".into(),
        json!(old_timeline.initcalls_total_ms()),
    );
    extra.insert("initcalls_grown_ms".into(), json!(added));
    Ok(())
}

pub fn change(runner: &Runner, base_rev: Option<&str>, runs: usize) -> Result<Vec<Value>> {
    let Some(rev) = base_rev else {
        return Ok(vec![json!({
            "bench": "kernel_change",
            "skipped": "no base revision (--base-kernel REV or $KILN_BENCH_BASE_KERNEL)",
        })]);
    };
    let base = kiln_tests::kernels::guest_at_revision(rev)
        .with_context(|| format!("building the guest kernel of revision {rev}"))?;
    let current = kiln_tests::kernels::guest()?;
    let base_vmlinux = std::fs::read(&base.vmlinux)
        .with_context(|| format!("reading {}", base.vmlinux.display()))?;
    let files = [("base-vmlinux".to_string(), base_vmlinux)];
    // Even runs boot this checkout's kernel, odd runs the base, one after the other.
    let kernel = r#"--kernel "$( [ $((i % 2)) = 0 ] && echo "$GUEST_VMLINUX" || echo "$FILES/base-vmlinux" )""#;
    let (both, _setup) = boot::samples(runner, runs * 2, kernel, boot::INITRAMFS, &files)?;
    let (new, old) = (boot::pick(&both, 0), boot::pick(&both, 1));
    let (new_median, old_median) = (stats::summary(&new).0, stats::summary(&old).0);
    let mut extra = Map::new();
    extra.insert("base_revision".into(), rev.into());
    extra.insert("base_median_ms".into(), old_median.into());
    extra.insert(
        "ratio".into(),
        ((new_median / old_median * 1000.0).round() / 1000.0).into(),
    );
    extra.insert("options_y".into(), built_in_options(&current)?.into());
    extra.insert("base_options_y".into(), built_in_options(&base)?.into());

    // Where the difference goes: one boot of each with initcall_debug. A kernel whose
    // agent never answers has boot times but no timeline: that is reported, not fatal.
    if let Err(e) = timelines(runner, &current, &base, rev, &mut extra) {
        eprintln!("kernel_change: no initcall timeline: {e:#}");
        extra.insert("timeline_error".into(), format!("{e:#}").into());
    }
    extra.insert(
        "guest".into(),
        "guest vmlinux + default initramfs, 1 vCPU, 128 MiB; base kernel alternating".into(),
    );
    Ok(vec![stats::result(
        "kernel_change",
        runner.path_name(),
        "ms",
        &new,
        extra,
    )])
}
