//! Summaries of repeated measurements, printed as the JSON lines `cargo xtask bench`
//! collects.

use serde_json::{json, Map, Value};

/// Median, min and max of `samples` (which must not be empty).
pub fn summary(samples: &[f64]) -> (f64, f64, f64) {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    (median, sorted[0], sorted[n - 1])
}

/// One benchmark result: `{"bench", "path", "runs", "median_<unit>", "min_<unit>",
/// "max_<unit>"}` plus any `extra` fields.
pub fn result(
    bench: &str,
    path: &str,
    unit: &str,
    samples: &[f64],
    extra: Map<String, Value>,
) -> Value {
    let (median, min, max) = summary(samples);
    let round = |v: f64| (v * 1000.0).round() / 1000.0;
    let mut obj = json!({
        "bench": bench,
        "path": path,
        "runs": samples.len(),
        format!("median_{unit}"): round(median),
        format!("min_{unit}"): round(min),
        format!("max_{unit}"): round(max),
    });
    if let Value::Object(map) = &mut obj {
        map.extend(extra);
    }
    obj
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(summary(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(summary(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }

    #[test]
    fn result_has_the_named_fields() {
        let r = result("boot", "testbed", "ms", &[10.0, 30.0, 20.0], Map::new());
        assert_eq!(r["bench"], "boot");
        assert_eq!(r["path"], "testbed");
        assert_eq!(r["runs"], 3);
        assert_eq!(r["median_ms"], 20.0);
        assert_eq!(r["min_ms"], 10.0);
        assert_eq!(r["max_ms"], 30.0);
    }
}
