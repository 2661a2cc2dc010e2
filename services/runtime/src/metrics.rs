//! Prometheus metrics without a global registry: each service owns its counters (a struct it
//! hands to the code doing the work) and renders them, with whatever it computes at scrape
//! time, into an [`Exposition`] (the Prometheus text format, version 0.0.4). Tests read a
//! service's own counters, so nothing is shared between services running in one test process.
//!
//! Metric names are written out in full where a service declares them
//! (`fleetcast_<service>_<name>_total`), never assembled from parts: operators grep for them,
//! and `ops/check-deploy` checks the Grafana dashboards against the names it finds in the code.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// The `Content-Type` of an exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whatever a service exports at `/metrics`, rendered on every scrape.
pub trait Collect: Send + Sync + 'static {
    fn collect(&self, out: &mut Exposition);
}

/// Metric families (`# HELP`, `# TYPE`) and their samples (`name{labels} value`), as text.
#[derive(Debug, Default)]
pub struct Exposition(String);

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a gauge family; its samples follow.
    pub fn gauge(&mut self, name: &str, help: &str) {
        self.family(name, "gauge", help);
    }

    /// Starts a counter family (its name ends in `_total`); its samples follow.
    pub fn counter(&mut self, name: &str, help: &str) {
        self.family(name, "counter", help);
    }

    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        // Writing into a String cannot fail.
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{key}=\"{}\"", escape(val));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {}", format_value(value));
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus spells the special values its own way; Rust's `Display` gives `3` for 3.0.
fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value == f64::INFINITY {
        "+Inf".into()
    } else if value == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        value.to_string()
    }
}

/// The wire name of a unit enum value (`RejectCode::TooLarge` → `too_large`), so a label says
/// what the events and the API say.
pub fn label_value<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".into(),
    }
}

/// A monotonic count without labels.
#[derive(Debug)]
pub struct Counter {
    name: &'static str,
    help: &'static str,
    value: AtomicU64,
}

impl Counter {
    pub const fn new(name: &'static str, help: &'static str) -> Self {
        Counter {
            name,
            help,
            value: AtomicU64::new(0),
        }
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }

    pub fn render(&self, out: &mut Exposition) {
        out.counter(self.name, self.help);
        out.sample(self.name, &[], self.get() as f64);
    }
}

/// A monotonic count per combination of label values. Label values must come from a small,
/// bounded set (reason codes, outcomes, configured app names): every one is a series kept
/// forever.
#[derive(Debug)]
pub struct CounterVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    values: Mutex<BTreeMap<Vec<String>, u64>>,
}

impl CounterVec {
    pub fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        CounterVec {
            name,
            help,
            labels,
            values: Mutex::new(BTreeMap::new()),
        }
    }

    /// Exports these label values at 0 from the start, so a rate over them is defined before
    /// the first event and dashboards show a flat line rather than nothing.
    pub fn starting_at_zero(self, label_values: &[&[&str]]) -> Self {
        for values in label_values {
            self.add(values, 0);
        }
        self
    }

    pub fn inc(&self, label_values: &[&str]) {
        self.add(label_values, 1);
    }

    pub fn add(&self, label_values: &[&str], n: u64) {
        let key = label_values.iter().map(|v| v.to_string()).collect();
        *self.lock().entry(key).or_default() += n;
    }

    pub fn get(&self, label_values: &[&str]) -> u64 {
        let key: Vec<String> = label_values.iter().map(|v| v.to_string()).collect();
        self.lock().get(&key).copied().unwrap_or(0)
    }

    pub fn render(&self, out: &mut Exposition) {
        out.counter(self.name, self.help);
        for (values, n) in self.lock().iter() {
            let labels: Vec<(&str, &str)> = self
                .labels
                .iter()
                .copied()
                .zip(values.iter().map(String::as_str))
                .collect();
            out.sample(self.name, &labels, *n as f64);
        }
    }

    /// A panic elsewhere while holding the lock leaves the counts valid: keep counting.
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<String>, u64>> {
        self.values.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn families_and_samples_render_as_prometheus_text() {
        let detected = Counter::new("demo_detected_total", "Packages detected.");
        detected.add(2);
        let rejected = CounterVec::new(
            "demo_rejected_total",
            "Packages rejected, by reason.",
            &["code"],
        )
        .starting_at_zero(&[&["too_large"]]);
        rejected.inc(&["invalid_name"]);
        let mut out = Exposition::new();
        detected.render(&mut out);
        rejected.render(&mut out);
        out.gauge("demo_ratio", "A ratio.");
        out.sample("demo_ratio", &[("a", "x"), ("b", "y")], 0.5);
        out.sample("demo_ratio", &[], f64::INFINITY);
        assert_eq!(
            out.into_string(),
            "# HELP demo_detected_total Packages detected.\n\
             # TYPE demo_detected_total counter\n\
             demo_detected_total 2\n\
             # HELP demo_rejected_total Packages rejected, by reason.\n\
             # TYPE demo_rejected_total counter\n\
             demo_rejected_total{code=\"invalid_name\"} 1\n\
             demo_rejected_total{code=\"too_large\"} 0\n\
             # HELP demo_ratio A ratio.\n\
             # TYPE demo_ratio gauge\n\
             demo_ratio{a=\"x\",b=\"y\"} 0.5\n\
             demo_ratio +Inf\n"
        );
        assert_eq!(rejected.get(&["invalid_name"]), 1);
        assert_eq!(rejected.get(&["corrupt_archive"]), 0);
    }

    #[test]
    fn enum_labels_are_their_wire_names() {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "snake_case")]
        enum Code {
            TooLarge,
        }
        assert_eq!(label_value(&Code::TooLarge), "too_large");
        assert_eq!(label_value(&3), "unknown");
    }
}
