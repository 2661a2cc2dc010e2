//! What the signer counts, served at `/metrics` on `metrics_listen` with its `/health`.

use std::sync::Arc;

use fleetcast_events::v1::RejectCode;
use fleetcast_runtime::metrics::{CounterFamily, counter, label_value};
use fleetcast_runtime::observe::{Endpoint, Identity};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

pub(crate) const IDENTITY: Identity = Identity {
    build_info: "fleetcast_signer_build_info",
    nats_connected: "fleetcast_signer_nats_connected",
    version: env!("CARGO_PKG_VERSION"),
};

pub(crate) struct Metrics {
    pub(crate) signed: Counter,
    rejected: CounterFamily<1>,
    pub(crate) rollbacks_signed: Counter,
    pub(crate) rollbacks_refused: Counter,
    pub(crate) timestamps: Counter,
}

impl Metrics {
    /// The signer's counters, and the endpoint serving them (with its identity).
    pub(crate) fn registered() -> (Arc<Self>, Arc<Endpoint>) {
        let mut registry = Registry::default();
        let r = &mut registry;
        let metrics = Metrics {
            signed: counter(
                r,
                "fleetcast_signer_releases_signed_total",
                "Releases whose file manifest was signed (release.signed); a redelivered one is counted once.",
            ),
            rejected: CounterFamily::new(
                r,
                "fleetcast_signer_releases_rejected_total",
                "Detected packages refused (release.rejected, or an invalid event), by reason code.",
                ["code"],
            ),
            rollbacks_signed: counter(
                r,
                "fleetcast_signer_rollbacks_signed_total",
                "Rollback directives signed (rollback.signed).",
            ),
            rollbacks_refused: counter(
                r,
                "fleetcast_signer_rollbacks_refused_total",
                "Rollback requests refused (not an earlier stored release, or not signed by this key).",
            ),
            timestamps: counter(
                r,
                "fleetcast_signer_timestamps_published_total",
                "Timestamps published to the trust bucket (agents' freshness signal).",
            ),
        };
        (Arc::new(metrics), Endpoint::new(IDENTITY, registry))
    }

    pub(crate) fn rejected(&self, code: RejectCode) {
        self.rejected.inc(&[label_value(&code).as_str()]);
    }
}
