//! What the watcher counts, served at `/metrics` on `metrics_listen` with its `/health`.

use fleetcast_events::v1::{PackageSource, RejectCode};
use fleetcast_runtime::metrics::{Collect, CounterVec, Exposition, label_value};
use fleetcast_runtime::observe::Identity;

pub(crate) const IDENTITY: Identity = Identity {
    build_info: "fleetcast_watcher_build_info",
    nats_connected: "fleetcast_watcher_nats_connected",
    version: env!("CARGO_PKG_VERSION"),
};

pub(crate) struct Metrics {
    detected: CounterVec,
    rejected: CounterVec,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        Metrics {
            detected: CounterVec::new(
                "fleetcast_watcher_packages_detected_total",
                "Packages validated and announced (package.detected), by source: drop_folder or ci.",
                &["source"],
            )
            .starting_at_zero(&[&["drop_folder"], &["ci"]]),
            rejected: CounterVec::new(
                "fleetcast_watcher_packages_rejected_total",
                "Packages refused, by reason code (schemas/package-rejected.schema.json).",
                &["code"],
            ),
        }
    }

    pub(crate) fn detected(&self, source: &PackageSource) {
        let source = match source {
            PackageSource::DropFolder { .. } => "drop_folder",
            PackageSource::Ci { .. } => "ci",
        };
        self.detected.inc(&[source]);
    }

    pub(crate) fn rejected(&self, code: RejectCode) {
        self.rejected.inc(&[&label_value(&code)]);
    }
}

impl Collect for Metrics {
    fn collect(&self, out: &mut Exposition) {
        self.detected.render(out);
        self.rejected.render(out);
    }
}
