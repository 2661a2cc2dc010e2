//! What the signer counts, served at `/metrics` on `metrics_listen` with its `/health`.

use fleetcast_events::v1::RejectCode;
use fleetcast_runtime::metrics::{Collect, Counter, CounterVec, Exposition, label_value};
use fleetcast_runtime::observe::Identity;

pub(crate) const IDENTITY: Identity = Identity {
    build_info: "fleetcast_signer_build_info",
    nats_connected: "fleetcast_signer_nats_connected",
    version: env!("CARGO_PKG_VERSION"),
};

pub(crate) struct Metrics {
    pub(crate) signed: Counter,
    rejected: CounterVec,
    pub(crate) rollbacks_signed: Counter,
    pub(crate) rollbacks_refused: Counter,
    pub(crate) timestamps: Counter,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        Metrics {
            signed: Counter::new(
                "fleetcast_signer_releases_signed_total",
                "Releases whose file manifest was signed (release.signed); a redelivered one is counted once.",
            ),
            rejected: CounterVec::new(
                "fleetcast_signer_releases_rejected_total",
                "Detected packages refused (release.rejected, or an invalid event), by reason code.",
                &["code"],
            ),
            rollbacks_signed: Counter::new(
                "fleetcast_signer_rollbacks_signed_total",
                "Rollback directives signed (rollback.signed).",
            ),
            rollbacks_refused: Counter::new(
                "fleetcast_signer_rollbacks_refused_total",
                "Rollback requests refused (not an earlier stored release, or not signed by this key).",
            ),
            timestamps: Counter::new(
                "fleetcast_signer_timestamps_published_total",
                "Timestamps published to the trust bucket (agents' freshness signal).",
            ),
        }
    }

    pub(crate) fn rejected(&self, code: RejectCode) {
        self.rejected.inc(&[&label_value(&code)]);
    }
}

impl Collect for Metrics {
    fn collect(&self, out: &mut Exposition) {
        self.signed.render(out);
        self.rejected.render(out);
        self.rollbacks_signed.render(out);
        self.rollbacks_refused.render(out);
        self.timestamps.render(out);
    }
}
