//! What the watcher counts, served at `/metrics` on `metrics_listen` with its `/health`.

use std::sync::Arc;

use fleetcast_events::v1::{PackageSource, RejectCode};
use fleetcast_runtime::metrics::{CounterFamily, label_value};
use fleetcast_runtime::observe::{Endpoint, Identity};
use prometheus_client::registry::Registry;

pub(crate) const IDENTITY: Identity = Identity {
    build_info: "fleetcast_watcher_build_info",
    nats_connected: "fleetcast_watcher_nats_connected",
    version: env!("CARGO_PKG_VERSION"),
};

pub(crate) struct Metrics {
    detected: CounterFamily<1>,
    rejected: CounterFamily<1>,
}

impl Metrics {
    /// The watcher's counters, and the endpoint serving them (with its identity).
    pub(crate) fn registered() -> (Arc<Self>, Arc<Endpoint>) {
        let mut registry = Registry::default();
        let metrics = Metrics {
            detected: CounterFamily::new(
                &mut registry,
                "fleetcast_watcher_packages_detected_total",
                "Packages validated and announced (package.detected), by source: drop_folder or ci.",
                ["source"],
            )
            .starting_at_zero(&[["drop_folder"], ["ci"]]),
            rejected: CounterFamily::new(
                &mut registry,
                "fleetcast_watcher_packages_rejected_total",
                "Packages refused, by reason code (schemas/package-rejected.schema.json).",
                ["code"],
            ),
        };
        (Arc::new(metrics), Endpoint::new(IDENTITY, registry))
    }

    pub(crate) fn detected(&self, source: &PackageSource) {
        let source = match source {
            PackageSource::DropFolder { .. } => "drop_folder",
            PackageSource::Ci { .. } => "ci",
        };
        self.detected.inc(&[source]);
    }

    pub(crate) fn rejected(&self, code: RejectCode) {
        self.rejected.inc(&[label_value(&code).as_str()]);
    }
}
