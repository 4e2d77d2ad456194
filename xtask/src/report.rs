//! `cargo xtask bench --report`: `docs/performance.md` from a results file.
//!
//! A results file is what `cargo xtask bench` writes to `target/bench.json`: one JSON object
//! per line, each result with `"bench"`, `"path"`, `"runs"` and `median_`/`min_`/`max_`
//! fields in one unit. A run also writes one line `{"run": {...}}` saying where and when it
//! ran ([`RunInfo`]); the page takes the commit, date and host from it, so a page made
//! later from an older file still names the run that measured it.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::budgets::Budgets;

/// Where and when a bench run measured its figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The checkout's commit (`git rev-parse HEAD`), with `-dirty` if it had changes.
    pub commit: String,
    /// UTC, `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SSZ`.
    pub date: String,
    /// `/proc/cpuinfo`'s model name, if known.
    pub cpu_model: Option<String>,
    /// The `/dev/kvm` that direct-path figures ran on.
    pub kvm: String,
    /// The test-bed host's KVM paging mode (`shadow (kvm_amd.npt=0)` or nested), if test-bed
    /// figures were taken.
    pub testbed_paging: Option<String>,
    /// Anything else a reader must know about the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl RunInfo {
    /// This checkout and this machine, now.
    pub fn here(root: &Path) -> RunInfo {
        let git = |args: &[&str]| {
            Command::new("git")
                .current_dir(root)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let mut commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
        if git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()) {
            commit.push_str("-dirty");
        }
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == "model name")
            .map(|(_, v)| v.trim().to_string());
        let hardware = kiln_tests::kernels::hardware_virtualization();
        RunInfo {
            commit,
            date: utc_now(),
            cpu_model,
            kvm: if hardware {
                "hardware virtualization (vmx/svm)".into()
            } else {
                "no hardware virtualization (real-kernel figures from the nested test bed)".into()
            },
            testbed_paging: (!hardware).then(|| {
                if std::env::var("KILN_TESTBED_NPT").as_deref() == Ok("1") {
                    "nested (kvm_amd.npt=1)".into()
                } else {
                    "shadow (kvm_amd.npt=0)".into()
                }
            }),
            note: None,
        }
    }

    /// The `{"run": …}` line of a results file.
    pub fn to_line(&self) -> String {
        serde_json::json!({ "run": self }).to_string()
    }

    /// The run line among `results`, if there is one.
    pub fn find(results: &[Value]) -> Option<RunInfo> {
        results
            .iter()
            .find_map(|r| serde_json::from_value(r.get("run")?.clone()).ok())
    }
}

/// What each benchmark measures and the command that runs it alone.
struct Bench {
    name: &'static str,
    /// Told apart by the result's `root` or `direction` field, when several share a name.
    variant: Option<&'static str>,
    what: &'static str,
    reproduce: &'static str,
}

const BENCHES: &[Bench] = &[
    Bench {
        name: "vmm_setup",
        variant: None,
        what: "kiln start to first KVM_RUN, tiny hand-made guest, 128 MiB",
        reproduce: "cargo xtask bench vmm_setup",
    },
    Bench {
        name: "vmm_memory",
        variant: None,
        what: "kiln's Pss minus the guest RAM it shares, spinning tiny guest, 128 MiB",
        reproduce: "cargo xtask bench vmm_memory",
    },
    Bench {
        name: "restore_direct",
        variant: None,
        what: "`kiln restore` of a tiny guest's 128 MiB snapshot, start to first KVM_RUN",
        reproduce: "cargo xtask bench restore_direct",
    },
    Bench {
        name: "empty_job",
        variant: None,
        what: "`kiln job` of `true`, process start to exit, seen from outside",
        reproduce: "cargo xtask bench empty_job",
    },
    Bench {
        name: "boot",
        variant: Some("initramfs"),
        what:
            "kiln start to the agent's boot-done mark; guest vmlinux + initramfs, 1 vCPU, 128 MiB",
        reproduce: "cargo run --release -p kiln-benches -- boot",
    },
    Bench {
        name: "boot",
        variant: Some("disk"),
        what: "the same, booted from a read-only ext4 root disk (no initramfs)",
        reproduce: "cargo run --release -p kiln-benches -- boot_root_disk",
    },
    Bench {
        name: "boot_acpi",
        variant: None,
        what: "`boot` with the ACPI tables (the default), each paired with a `--no-acpi` boot \
               in the same run",
        reproduce: "cargo xtask bench boot_acpi",
    },
    Bench {
        name: "kernel_change",
        variant: None,
        what: "`boot` with this guest kernel, alternating in one run with the kernel of an \
               earlier `guest.config` (the base revision)",
        reproduce: "KILN_BENCH_BASE_KERNEL=REV cargo xtask bench kernel_change",
    },
    Bench {
        name: "guest_kernel",
        variant: None,
        what: "size of the guest kernel's vmlinux (what kiln loads)",
        reproduce: "cargo xtask bench guest_kernel",
    },
    Bench {
        name: "vsock_throughput",
        variant: None,
        what: "host reads `head -c 32MiB /dev/zero` from the guest through `kiln exec`",
        reproduce: "cargo xtask bench vsock_throughput",
    },
    Bench {
        name: "vsock_exec",
        variant: None,
        what: "`kiln exec -- true`, process start to exit",
        reproduce: "cargo xtask bench vsock_exec",
    },
    Bench {
        name: "snapshot",
        variant: None,
        what: "`kiln ctl snapshot` of a booted 256 MiB agent guest, process start to exit",
        reproduce: "cargo xtask bench snapshot",
    },
    Bench {
        name: "restore",
        variant: None,
        what: "`kiln restore` start to the agent answering `kiln exec -- true`",
        reproduce: "cargo run --release -p kiln-benches -- restore",
    },
    Bench {
        name: "fork",
        variant: None,
        what: "`kiln fork --count 16` of a 256 MiB agent guest until every clone answers",
        reproduce: "cargo xtask bench fork",
    },
    Bench {
        name: "fork_memory",
        variant: None,
        what: "Pss per clone with 16 clones of one snapshot",
        reproduce: "cargo xtask bench fork_memory",
    },
    Bench {
        name: "blk",
        variant: Some("write"),
        what: "guest `dd` of 64 MiB to a raw disk, `oflag=direct`, around `kiln exec`",
        reproduce: "cargo xtask bench blk",
    },
    Bench {
        name: "blk",
        variant: Some("read"),
        what: "guest `dd` of 64 MiB from a raw disk, `iflag=direct`, around `kiln exec`",
        reproduce: "cargo xtask bench blk",
    },
    Bench {
        name: "net",
        variant: None,
        what: "guest `wget` of a 20 MiB file from the host over a TAP, guest time",
        reproduce: "cargo xtask bench net",
    },
    Bench {
        name: "nesting_create_boot",
        variant: None,
        what: "nesting server Create, Debian image booted, call to sshd's banner, 256 MiB",
        reproduce: "cargo xtask bench nesting_create",
    },
    Bench {
        name: "nesting_create_restore",
        variant: None,
        what: "the same, restoring a clone of the slot's warm snapshot instead of booting",
        reproduce: "cargo xtask bench nesting_create",
    },
    Bench {
        name: "peer_boot",
        variant: None,
        what: "kiln start to exit, the guest vmlinux + a busybox init that reboots, alternating \
               with Firecracker on the same kernel and initramfs (`ratio` kiln / Firecracker)",
        reproduce: "cargo xtask bench peer_boot",
    },
    Bench {
        name: "peer_restore",
        variant: None,
        what: "restore of the same agent guest to `kiln exec -- true` answering, alternating \
               with Firecracker's snapshot load (`ratio` kiln / Firecracker)",
        reproduce: "cargo xtask bench peer_restore",
    },
    Bench {
        name: "fork_100",
        variant: None,
        what: "`kiln fork --count 100` until every clone answers (`ratio_to_one`: per 1 clone, \
               same run)",
        reproduce: "cargo xtask bench fork_100",
    },
    Bench {
        name: "docker",
        variant: None,
        what: "`kiln job --docker`: dockerd start to its first answer on Docker's socket, in the guest (Debian workload image, 2 vCPUs, 1 GiB)",
        reproduce: "cargo xtask bench docker",
    },
];

fn describe(result: &Value) -> (&'static str, &'static str) {
    let name = result["bench"].as_str().unwrap_or("");
    let variant = ["root", "direction"]
        .iter()
        .find_map(|k| result[*k].as_str());
    BENCHES
        .iter()
        .find(|b| b.name == name && (b.variant.is_none() || b.variant == variant))
        .map_or(("", ""), |b| (b.what, b.reproduce))
}

/// The unit a result's figures are in: the suffix that has all of median_, min_ and max_.
fn unit(fields: &serde_json::Map<String, Value>) -> Option<&str> {
    fields
        .keys()
        .filter_map(|k| k.strip_prefix("median_"))
        .find(|u| {
            fields.contains_key(&format!("min_{u}")) && fields.contains_key(&format!("max_{u}"))
        })
}

fn unit_label(unit: &str) -> &str {
    match unit {
        "mib_s" => "MiB/s",
        "mib" => "MiB",
        other => other,
    }
}

fn number(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The page for `results` (read from `source`, named on the page), with its budgets.
pub fn render(results: &[Value], run: &RunInfo, budgets: &Budgets, source: &str) -> String {
    let mut page = String::new();
    let w = &mut page;
    let _ = writeln!(w, "# Performance");
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "<!-- Generated by `cargo xtask bench --report --from {source}`; edit xtask/src/report.rs, not this file. -->"
    );
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "To measure kiln on your host, run `cargo xtask bench` (all benchmarks, a release build; \
         `cargo xtask bench NAME` runs those whose names contain NAME). It prints one JSON object \
         per line and keeps them in `target/bench.json`. `cargo xtask bench --check` then holds \
         the figures to the budgets below, and `cargo xtask bench --report` turns \
         `target/bench.json` into this page."
    );
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "Figures marked *test bed* come from the nested test bed (QEMU TCG emulating an AMD CPU \
         with SVM; see [testing.md](testing.md)): its absolute times are some 20–30 times those \
         of hardware and vary from run to run, so compare ratios within one run, not \
         milliseconds with another host. *Direct* figures ran on the host's own `/dev/kvm`."
    );
    let _ = writeln!(w);
    let _ = writeln!(w, "## The run on this page");
    let _ = writeln!(w);
    let _ = writeln!(w, "| | |");
    let _ = writeln!(w, "|---|---|");
    let _ = writeln!(w, "| commit | `{}` |", run.commit);
    let _ = writeln!(w, "| date (UTC) | {} |", run.date);
    let _ = writeln!(
        w,
        "| CPU | {} |",
        run.cpu_model.as_deref().unwrap_or("not recorded")
    );
    let _ = writeln!(w, "| `/dev/kvm` | {} |", run.kvm);
    let _ = writeln!(
        w,
        "| test-bed paging | {} |",
        run.testbed_paging
            .as_deref()
            .unwrap_or("no test-bed figures")
    );
    if let Some(note) = &run.note {
        let _ = writeln!(w, "| note | {note} |");
    }
    let _ = writeln!(w);
    let _ = writeln!(w, "## Figures");
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "| bench | what it measures | path | runs | median | min–max | reproduce |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|");
    for r in results {
        let (Some(fields), Some(name)) = (r.as_object(), r["bench"].as_str()) else {
            continue;
        };
        let Some(unit) = unit(fields) else { continue };
        let get = |k: &str| fields.get(&format!("{k}_{unit}")).and_then(Value::as_f64);
        let (Some(median), Some(min), Some(max)) = (get("median"), get("min"), get("max")) else {
            continue;
        };
        let label = match ["root", "direction"].iter().find_map(|k| r[*k].as_str()) {
            Some(v) => format!("`{name}` ({v})"),
            None => format!("`{name}`"),
        };
        let (what, reproduce) = describe(r);
        let mut what = what.to_string();
        if let Some(mib) = fields.get("memory_mib").and_then(Value::as_f64) {
            let _ = write!(what, "; memory file {} MiB", number(mib));
        }
        if let Some(mib) = fields.get("bzimage_mib").and_then(Value::as_f64) {
            let _ = write!(what, "; bzImage {} MiB", number(mib));
        }
        if let Some(n) = fields.get("options_y").and_then(Value::as_u64) {
            let _ = write!(what, "; {n} options built in");
        }
        // A figure measured against another in the same run: what it was compared with,
        // that one's median, and the ratio.
        let compared = match fields.get("base_revision").and_then(Value::as_str) {
            Some(rev) => Some((format!("base `{rev}`"), "base_median_ms", "ratio")),
            None if fields.contains_key("no_acpi_median_ms") => {
                Some(("`--no-acpi`".to_string(), "no_acpi_median_ms", "ratio"))
            }
            None if fields.contains_key("peer_median_ms") => Some((
                fields
                    .get("peer")
                    .and_then(Value::as_str)
                    .unwrap_or("the peer")
                    .to_string(),
                "peer_median_ms",
                "ratio",
            )),
            None if fields.contains_key("one_clone_ms") => {
                Some(("1 clone".to_string(), "one_clone_ms", "ratio_to_one"))
            }
            None => None,
        };
        if let Some((label, key, ratio)) = compared {
            let ratio = fields.get(ratio).and_then(Value::as_f64);
            let other = fields.get(key).and_then(Value::as_f64);
            if let (Some(ratio), Some(other)) = (ratio, other) {
                let _ = write!(
                    what,
                    "; {label}: median {} ms, ratio {ratio:.3}",
                    number(other)
                );
            }
        }
        if let Some(phases) = fields.get("kiln_phases_ms").and_then(Value::as_array) {
            let listed: Vec<String> = phases
                .iter()
                .filter_map(|p| Some(format!("{} {}", p[0].as_str()?, number(p[1].as_f64()?))))
                .collect();
            if !listed.is_empty() {
                let _ = write!(
                    what,
                    "; kiln's set-up, ms from start: {}",
                    listed.join(", ")
                );
            }
        }
        let path = match r["path"].as_str() {
            Some("testbed") => "test bed",
            Some(other) => other,
            None => "?",
        };
        let u = unit_label(unit);
        let reproduce = if reproduce.is_empty() {
            format!("`cargo xtask bench {name}`")
        } else {
            format!("`{reproduce}`")
        };
        let _ = writeln!(
            w,
            "| {label} | {what} | {path} | {} | {} {u} | {}–{} {u} | {reproduce} |",
            r["runs"]
                .as_u64()
                .map_or_else(|| "?".into(), |n| n.to_string()),
            number(median),
            number(min),
            number(max),
        );
    }
    let _ = writeln!(w);
    against_firecracker(w, results);
    let _ = writeln!(w, "## Budgets");
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "`cargo xtask bench --check` fails when a figure exceeds its budget, baseline × (1 + \
         tolerance), from `benches/budgets.toml`. Test-bed times are budgeted as ratios to the \
         same run's `boot`, because the test bed's speed varies; direct-path times and sizes are \
         absolute. `cargo xtask bench --check --results FILE` checks a saved run without \
         running anything."
    );
    let _ = writeln!(w);
    let _ = writeln!(w, "| budget | figure | limit | this run | |");
    let _ = writeln!(w, "|---|---|---|---|---|");
    for (budget, verdict) in budgets.budgets.iter().zip(budgets.check(results)) {
        let figure = match &budget.relative_to {
            Some(base) => format!(
                "`{}.{}` / `{}.{}`",
                budget.bench, budget.field, base.bench, base.field
            ),
            None => format!("`{}.{}`", budget.bench, budget.field),
        };
        let value = verdict.value.map_or_else(|| "-".into(), number);
        let result = match (&verdict.missing, verdict.pass) {
            _ if verdict.skipped.is_some() => {
                format!("skipped ({})", verdict.skipped.as_deref().unwrap_or(""))
            }
            (Some(why), _) => format!("not measured ({why})"),
            (None, true) => "holds".into(),
            (None, false) => "**over budget**".into(),
        };
        let _ = writeln!(
            w,
            "| {} | {figure} | {} | {value} | {result} |",
            budget.name,
            number(verdict.limit)
        );
    }
    page
}

/// What the side-by-side runs with Firecracker show, from the `peer_` results: where kiln's
/// restore spends its time before the guest runs, and what the comparison has changed.
fn against_firecracker(w: &mut String, results: &[Value]) {
    let find = |name: &str| {
        results
            .iter()
            .find(|r| r["bench"] == name && r.get("peer_median_ms").is_some())
    };
    let (boot, restore) = (find("peer_boot"), find("peer_restore"));
    if boot.is_none() && restore.is_none() {
        return;
    }
    let _ = writeln!(w, "## Against Firecracker");
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "The `peer_` rows run kiln and Firecracker on the same guest vmlinux and initramfs, \
         taking turns in one test-bed run; a ratio below 1 means kiln is faster. The targets \
         are `peer_boot` ≤ 0.90 and `peer_restore` ≤ 0.80 (see the budgets below)."
    );
    let _ = writeln!(w);
    if let Some(r) = restore {
        let phases: Vec<(String, f64)> = r["kiln_phases_ms"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        let at = |name: &str| phases.iter().find(|p| p.0 == name).map(|p| p.1);
        if let (Some(first_run), Some(cli), Some(median)) = (
            at("first_kvm_run"),
            at("cli_and_config"),
            r["median_ms"].as_f64(),
        ) {
            let _ = writeln!(
                w,
                "- **Restore.** Of kiln's median {} ms to the guest answering, {} ms pass before \
                 the restored vCPU first runs, {} ms of them before kiln opens the snapshot \
                 (`cli_and_config`: arguments, logging and checks, timed from `main`). The \
                 rest is the guest resuming and answering, and kiln's refresh of its clock and \
                 entropy over vsock, which shares the guest with the first `kiln exec`. The \
                 comparison found one cause of slow restores and fixed it: the restored vsock \
                 device let host connections reach the guest before the guest had handled the \
                 transport reset, and reused host ports the guest still held, so the first \
                 connections were dropped and retried seconds later; it now holds them until \
                 the guest has handled the reset, on ports the snapshotted VM never used.",
                number(median),
                number(first_run),
                number(cli)
            );
        }
    }
    if let Some(r) = boot {
        if let (Some(ratio), Some(median), Some(peer)) = (
            r["ratio"].as_f64(),
            r["median_ms"].as_f64(),
            r["peer_median_ms"].as_f64(),
        ) {
            let _ = writeln!(
                w,
                "- **Boot.** kiln median {} ms, Firecracker {} ms, ratio {ratio:.3}. Nearly all \
                 of it is the guest kernel booting; what would take a tenth off that under \
                 kiln has not been found.",
                number(median),
                number(peer)
            );
        }
    }
    let _ = writeln!(w);
}

/// Writes the page for the results in `from` to `out`.
pub fn write(root: &Path, from: &Path, out: &Path) -> Result<()> {
    let results = crate::budgets::read_results(from)?;
    let run = RunInfo::find(&results).unwrap_or_else(|| {
        // A file without a run line (an older one): name this checkout and the file's date.
        let mut run = RunInfo::here(root);
        run.note = Some(format!(
            "{} has no run line: commit and date are the checkout's at report time",
            from.display()
        ));
        run
    });
    let budgets = Budgets::load(&root.join("benches/budgets.toml"))?;
    let source = from
        .strip_prefix(root)
        .unwrap_or(from)
        .display()
        .to_string();
    let page = render(&results, &run, &budgets, &source);
    std::fs::write(out, page).with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "xtask bench: wrote {} from {}",
        out.display(),
        from.display()
    );
    Ok(())
}

/// Now, in UTC, as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc(secs)
}

/// `secs` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (year, month, day) = kiln::civil::from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run() -> RunInfo {
        RunInfo {
            commit: "abc123".into(),
            date: "2026-01-02".into(),
            cpu_model: None,
            kvm: "hardware".into(),
            testbed_paging: Some("shadow (kvm_amd.npt=0)".into()),
            note: None,
        }
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_170_000), "2026-12-02T00:06:40Z");
    }

    #[test]
    fn the_run_line_round_trips_and_is_found() {
        let line: Value = serde_json::from_str(&run().to_line()).unwrap();
        let results = vec![json!({"bench": "boot"}), line];
        assert_eq!(RunInfo::find(&results), Some(run()));
        assert_eq!(RunInfo::find(&results[..1]), None);
    }

    #[test]
    fn the_page_names_the_run_figures_and_budgets() {
        let budgets: Budgets = toml::from_str(
            r#"
[[budget]]
name = "set-up"
bench = "vmm_setup"
field = "median_ms"
baseline = 2.0
tolerance = 1.0
[[budget]]
name = "restore per boot"
bench = "restore"
field = "median_ms"
relative_to = { bench = "boot", field = "median_ms" }
baseline = 0.1
tolerance = 0.0
"#,
        )
        .unwrap();
        let results = vec![
            json!({"bench":"vmm_setup","path":"direct","runs":30,"median_ms":2.66,"min_ms":2.32,"max_ms":6.13}),
            json!({"bench":"boot","path":"testbed","runs":10,"root":"initramfs","median_ms":2315.0,"min_ms":2092.0,"max_ms":2401.0}),
            json!({"bench":"restore","path":"testbed","runs":3,"median_ms":337.0,"min_ms":327.0,"max_ms":671.0}),
        ];
        let page = render(&results, &run(), &budgets, "x.json");
        assert!(page.contains("| commit | `abc123` |"), "{page}");
        assert!(
            page.contains("| test-bed paging | shadow (kvm_amd.npt=0) |"),
            "{page}"
        );
        assert!(
            page.contains("| `vmm_setup` | kiln start to first KVM_RUN, tiny hand-made guest, 128 MiB | direct | 30 | 2.66 ms | 2.32–6.13 ms | `cargo xtask bench vmm_setup` |"),
            "{page}"
        );
        assert!(page.contains("| `boot` (initramfs) |"), "{page}");
        assert!(
            page.contains("| set-up | `vmm_setup.median_ms` | 4.00 | 2.66 | holds |"),
            "{page}"
        );
        // 337 / 2315 = 0.146 > 0.1: over budget, and the page says so.
        assert!(page.contains("| 0.10 | 0.15 | **over budget** |"), "{page}");
    }
}
