//! Prometheus metrics through `prometheus-client`, without a global registry: each service makes
//! its own [`Registry`], registers its counters into it (keeping a handle for the code doing the
//! work), adds a [`Collector`](prometheus_client::collector::Collector) for whatever it computes
//! at scrape time, and hands the registry to its endpoint ([`crate::observe::Endpoint`]). Tests
//! run several services in one process and read a service's own counters, so nothing is shared.
//!
//! Metric names are written out in full where a service declares them
//! (`fleetcast_<service>_<name>_total`), never assembled from parts: operators grep for them,
//! and `ops/check-deploy` checks the Grafana dashboards against the names it finds in the code.
//! prometheus-client adds a counter's `_total` itself, so the helpers here take it off again.

use std::fmt;

use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, NoLabelSet,
    prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// The `Content-Type` of what [`encode`] writes: the Prometheus text format, version 0.0.4, as
/// the endpoints served before prometheus-client (its OpenMetrics encoder would change the
/// `# TYPE` lines scrapers and tests read).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The label set of a sample without labels, for [`gauges`] and [`counters`].
pub const NO_LABELS: [(&str, &str); 0] = [];

/// `registries`, one after the other, as one `/metrics` body (the text format has no end
/// marker, so a scrape-time registry can follow a service's own).
pub fn encode(registries: &[&Registry]) -> Result<String, fmt::Error> {
    let mut out = String::new();
    for registry in registries {
        prometheus_text::encode(&mut out, registry)?;
    }
    Ok(out)
}

/// The wire name of a unit enum value (`RejectCode::TooLarge` → `too_large`), so a label says
/// what the events and the API say.
pub use fleetcast_events::wire_name as label_value;

/// prometheus-client appends `_total` to a counter's name; declarations keep the full name.
fn counter_family(name: &'static str) -> &'static str {
    debug_assert!(
        name.ends_with("_total"),
        "counter {name} must end in _total"
    );
    name.strip_suffix("_total").unwrap_or(name)
}

/// prometheus-client ends a registered metric's help with a period of its own.
fn registered_help(help: &'static str) -> &'static str {
    help.strip_suffix('.').unwrap_or(help)
}

/// A monotonic count without labels, registered as `name` (ending in `_total`).
pub fn counter(registry: &mut Registry, name: &'static str, help: &'static str) -> Counter {
    let counter = Counter::default();
    registry.register(counter_family(name), registered_help(help), counter.clone());
    counter
}

/// A monotonic count per combination of the values of its `N` labels. Label values must come
/// from a small, bounded set (reason codes, outcomes, configured app names): every one is a
/// series kept forever.
#[derive(Debug, Clone)]
pub struct CounterFamily<const N: usize> {
    labels: [&'static str; N],
    family: Family<[(&'static str, String); N], Counter>,
}

impl<const N: usize> CounterFamily<N> {
    /// Registers the family as `name` (ending in `_total`) with these label names.
    pub fn new(
        registry: &mut Registry,
        name: &'static str,
        help: &'static str,
        labels: [&'static str; N],
    ) -> Self {
        let family = Family::default();
        registry.register(counter_family(name), registered_help(help), family.clone());
        CounterFamily { labels, family }
    }

    /// Exports these label values at 0 from the start, so a rate over them is defined before
    /// the first event and dashboards show a flat line rather than nothing.
    pub fn starting_at_zero(self, label_values: &[[&str; N]]) -> Self {
        for values in label_values {
            self.add(values, 0);
        }
        self
    }

    pub fn inc(&self, label_values: &[&str; N]) {
        self.add(label_values, 1);
    }

    pub fn add(&self, label_values: &[&str; N], n: u64) {
        self.family.get_or_create(&self.key(label_values)).inc_by(n);
    }

    /// The count of these label values (0 for a series not exported yet, without creating it).
    pub fn get(&self, label_values: &[&str; N]) -> u64 {
        self.family
            .get(&self.key(label_values))
            .map_or(0, |counter| counter.get())
    }

    fn key(&self, label_values: &[&str; N]) -> [(&'static str, String); N] {
        std::array::from_fn(|i| (self.labels[i], label_values[i].to_string()))
    }
}

/// A gauge family computed at scrape time, for a collector: its `# HELP` and `# TYPE`, then one
/// sample per label set (even with none, so the family is always listed).
pub fn gauges<S, V>(
    out: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    samples: impl IntoIterator<Item = (S, V)>,
) -> fmt::Result
where
    S: EncodeLabelSet,
    V: EncodeGaugeValue,
{
    let mut family = out.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// A counter family whose counts are kept elsewhere and read at scrape time, for a collector;
/// `name` ends in `_total`.
pub fn counters<S, V>(
    out: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    samples: impl IntoIterator<Item = (S, V)>,
) -> fmt::Result
where
    S: EncodeLabelSet,
    V: EncodeCounterValue,
{
    let name = counter_family(name);
    let mut family = out.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use prometheus_client::collector::Collector;

    use super::*;

    #[derive(Debug)]
    struct Ratio;

    impl Collector for Ratio {
        fn encode(&self, mut out: DescriptorEncoder) -> fmt::Result {
            gauges(
                &mut out,
                "demo_ratio",
                "A ratio.",
                [([("a", "x"), ("b", "y\"\n")], 0.5)],
            )?;
            gauges(&mut out, "demo_ratio_max", "Its limit.", [(NO_LABELS, 2)])?;
            counters(&mut out, "demo_seen_total", "Seen.", [([("a", "x")], 7u64)])
        }
    }

    #[test]
    fn families_and_samples_render_as_prometheus_text() {
        let mut registry = Registry::default();
        let detected = counter(&mut registry, "demo_detected_total", "Packages detected.");
        detected.inc_by(2);
        let rejected = CounterFamily::new(
            &mut registry,
            "demo_rejected_total",
            "Packages rejected, by reason.",
            ["code"],
        )
        .starting_at_zero(&[["too_large"]]);
        rejected.inc(&["invalid_name"]);
        registry.register_collector(Box::new(Ratio));
        let text = encode(&[&registry]).expect("encode");
        for line in [
            "# HELP demo_detected_total Packages detected.\n\
             # TYPE demo_detected_total counter\n\
             demo_detected_total 2\n\
             # HELP demo_rejected_total Packages rejected, by reason.\n\
             # TYPE demo_rejected_total counter\n",
            "demo_rejected_total{code=\"invalid_name\"} 1\n",
            "demo_rejected_total{code=\"too_large\"} 0\n",
            "# HELP demo_ratio A ratio.\n\
             # TYPE demo_ratio gauge\n\
             demo_ratio{a=\"x\",b=\"y\\\"\\n\"} 0.5\n\
             # HELP demo_ratio_max Its limit.\n\
             # TYPE demo_ratio_max gauge\n\
             demo_ratio_max 2\n\
             # HELP demo_seen_total Seen.\n\
             # TYPE demo_seen_total counter\n\
             demo_seen_total{a=\"x\"} 7\n",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert_eq!(rejected.get(&["invalid_name"]), 1);
        assert_eq!(rejected.get(&["corrupt_archive"]), 0);
        assert!(
            !encode(&[&registry])
                .expect("encode")
                .contains("corrupt_archive")
        );
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
