//! Performance budgets (`benches/budgets.toml`) and the check `cargo xtask bench --check`
//! makes of a results file against them.
//!
//! A budget names one figure of one benchmark's result and a baseline; the figure may not
//! exceed `baseline × (1 + tolerance)`. Where absolute times are not stable across machines
//! (the nested test bed), the figure is a ratio to another benchmark of the same run
//! (`relative_to`), e.g. restore time per boot time. Counts (bytes, MiB) are absolute.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
pub struct Budgets {
    #[serde(rename = "budget")]
    pub budgets: Vec<Budget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// What the budget guards, in words.
    pub name: String,
    /// The benchmark (`"bench"` of a result line) and the field of it.
    pub bench: String,
    pub field: String,
    /// Divide by this figure of the same run first.
    #[serde(default)]
    pub relative_to: Option<Figure>,
    /// The figure (or ratio) as measured when the budget was set.
    pub baseline: f64,
    /// How far above the baseline the figure may go, as a fraction (0.25: 25 %).
    pub tolerance: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Figure {
    pub bench: String,
    pub field: String,
}

/// The outcome of one budget.
#[derive(Debug, PartialEq)]
pub struct Verdict {
    pub name: String,
    pub value: Option<f64>,
    pub limit: f64,
    pub pass: bool,
    /// Why there is no value, if there is none.
    pub missing: Option<String>,
    /// Why the benchmark did not run, when it says it was skipped on purpose (a peer VMM
    /// that is not installed, a comparison nobody asked for): such a budget passes.
    pub skipped: Option<String>,
}

impl Budgets {
    pub fn load(path: &Path) -> Result<Budgets> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let budgets: Budgets =
            toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?;
        for b in &budgets.budgets {
            if !(b.baseline > 0.0 && b.tolerance >= 0.0) {
                bail!(
                    "{}: budget {:?} needs a positive baseline and a tolerance >= 0",
                    path.display(),
                    b.name
                );
            }
        }
        Ok(budgets)
    }

    /// Checks every budget against `results` (the JSON objects of one bench run).
    pub fn check(&self, results: &[Value]) -> Vec<Verdict> {
        self.budgets.iter().map(|b| b.check(results)).collect()
    }
}

impl Budget {
    fn limit(&self) -> f64 {
        self.baseline * (1.0 + self.tolerance)
    }

    fn check(&self, results: &[Value]) -> Verdict {
        let limit = self.limit();
        let benches = std::iter::once(&self.bench).chain(self.relative_to.iter().map(|b| &b.bench));
        if let Some(why) = benches.into_iter().find_map(|b| skipped(results, b)) {
            return Verdict {
                name: self.name.clone(),
                value: None,
                limit,
                pass: true,
                missing: None,
                skipped: Some(why),
            };
        }
        let value =
            figure(results, &self.bench, &self.field).and_then(|v| match &self.relative_to {
                None => Ok(v),
                Some(base) => {
                    let b = figure(results, &base.bench, &base.field)?;
                    if b > 0.0 {
                        Ok(v / b)
                    } else {
                        Err(format!(
                            "{}.{} is {b}, not a divisor",
                            base.bench, base.field
                        ))
                    }
                }
            });
        match value {
            Ok(v) => Verdict {
                name: self.name.clone(),
                value: Some(v),
                limit,
                pass: v <= limit,
                missing: None,
                skipped: None,
            },
            Err(why) => Verdict {
                name: self.name.clone(),
                value: None,
                limit,
                pass: false,
                missing: Some(why),
                skipped: None,
            },
        }
    }
}

/// Why `bench` was skipped, if its result is a `{"bench": …, "skipped": why}` line.
fn skipped(results: &[Value], bench: &str) -> Option<String> {
    results
        .iter()
        .find(|r| r["bench"] == bench)
        .and_then(|r| r["skipped"].as_str())
        .map(str::to_string)
}

/// `field` of the result whose `"bench"` is `bench`.
fn figure(results: &[Value], bench: &str, field: &str) -> Result<f64, String> {
    let result = results
        .iter()
        .find(|r| r["bench"] == bench)
        .ok_or_else(|| format!("no result for benchmark {bench:?}"))?;
    result[field]
        .as_f64()
        .ok_or_else(|| format!("benchmark {bench:?} has no number {field:?}"))
}

/// Reads a results file: one JSON object per line (what `cargo xtask bench` writes).
pub fn read_results(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).with_context(|| format!("{}: not JSON: {l}", path.display()))
        })
        .collect()
}

/// Prints the verdicts as a table; returns whether all passed.
pub fn report(verdicts: &[Verdict]) -> bool {
    println!("{:<58} {:>10} {:>10}  result", "budget", "value", "limit");
    for v in verdicts {
        let value = v
            .value
            .map_or_else(|| "-".to_string(), |x| format!("{x:.3}"));
        let result = match (&v.missing, v.pass) {
            _ if v.skipped.is_some() => format!("skipped ({})", v.skipped.as_deref().unwrap_or("")),
            (Some(why), _) => format!("FAIL ({why})"),
            (None, true) => "ok".to_string(),
            (None, false) => "FAIL (over budget)".to_string(),
        };
        println!("{:<58} {value:>10} {:>10.3}  {result}", v.name, v.limit);
    }
    verdicts.iter().all(|v| v.pass)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BUDGETS: &str = r#"
[[budget]]
name = "VMM set-up (direct)"
bench = "vmm_setup"
field = "median_ms"
baseline = 3.0
tolerance = 1.0

[[budget]]
name = "restore per boot (test bed)"
bench = "restore"
field = "median_ms"
relative_to = { bench = "boot", field = "median_ms" }
baseline = 0.3
tolerance = 0.5
"#;

    fn budgets() -> Budgets {
        toml::from_str(BUDGETS).unwrap()
    }

    fn run(setup_ms: f64, restore_ms: f64, boot_ms: f64) -> Vec<Value> {
        vec![
            json!({"bench": "vmm_setup", "median_ms": setup_ms}),
            json!({"bench": "restore", "median_ms": restore_ms}),
            json!({"bench": "boot", "median_ms": boot_ms}),
        ]
    }

    #[test]
    fn results_within_budget_pass() {
        let verdicts = budgets().check(&run(3.5, 600.0, 2200.0));
        assert!(verdicts.iter().all(|v| v.pass), "{verdicts:?}");
        assert!((verdicts[1].value.unwrap() - 600.0 / 2200.0).abs() < 1e-9);
        assert!(report(&verdicts));
    }

    #[test]
    fn a_regressed_result_fails_its_budget_only() {
        // Set-up three times slower than the baseline: over 3.0 × 2.
        let verdicts = budgets().check(&run(9.0, 600.0, 2200.0));
        assert!(!verdicts[0].pass && verdicts[0].missing.is_none());
        assert!(verdicts[1].pass);
        assert!(!report(&verdicts));
        // A slow machine slows boot and restore alike: the ratio still passes. A restore
        // that got slower relative to boot does not.
        assert!(budgets().check(&run(3.0, 1200.0, 4400.0))[1].pass);
        assert!(!budgets().check(&run(3.0, 1200.0, 2200.0))[1].pass);
    }

    #[test]
    fn a_missing_result_fails_and_says_which() {
        let verdicts = budgets().check(&run(3.0, 600.0, 2200.0)[..1]);
        assert!(!verdicts[1].pass);
        let why = verdicts[1].missing.as_deref().unwrap();
        assert!(why.contains("\"restore\""), "{why}");
    }

    #[test]
    fn a_skipped_benchmark_passes_its_budget_and_says_why() {
        let mut results = run(3.0, 600.0, 2200.0);
        results[2] = json!({"bench": "boot", "skipped": "no peer installed"});
        let verdicts = budgets().check(&results);
        assert!(
            verdicts[1].pass && verdicts[1].value.is_none(),
            "{verdicts:?}"
        );
        assert_eq!(verdicts[1].skipped.as_deref(), Some("no peer installed"));
        assert!(verdicts[0].skipped.is_none());
        assert!(report(&verdicts));
    }

    #[test]
    fn the_committed_budgets_parse() {
        let path = crate::repo_root().join("benches/budgets.toml");
        let budgets = Budgets::load(&path).unwrap();
        assert!(!budgets.budgets.is_empty());
    }

    #[test]
    fn nonsense_budgets_are_refused() {
        let dir = std::env::temp_dir().join(format!("kiln-budgets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b.toml");
        std::fs::write(
            &path,
            "[[budget]]\nname='x'\nbench='b'\nfield='f'\nbaseline=0\ntolerance=1\n",
        )
        .unwrap();
        assert!(Budgets::load(&path).is_err());
        std::fs::write(&path, "[[budget]]\nname='x'\nbench='b'\n").unwrap();
        assert!(Budgets::load(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
