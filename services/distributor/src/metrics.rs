//! What the distributor counts, served at `/metrics` on `metrics_listen` with its `/health`.

use fleetcast_events::v1::RejectCode;
use fleetcast_runtime::metrics::{Collect, Counter, CounterVec, Exposition, label_value};
use fleetcast_runtime::observe::Identity;

use crate::IngestReport;

pub(crate) const IDENTITY: Identity = Identity {
    build_info: "fleetcast_distributor_build_info",
    nats_connected: "fleetcast_distributor_nats_connected",
    version: env!("CARGO_PKG_VERSION"),
};

pub(crate) struct Metrics {
    pub(crate) stored: Counter,
    chunks: CounterVec,
    stored_bytes: Counter,
    rejected: CounterVec,
    pub(crate) failures: Counter,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        Metrics {
            stored: Counter::new(
                "fleetcast_distributor_releases_stored_total",
                "Releases stored by this instance: chunks, chunk index, record and release.stored.",
            ),
            chunks: CounterVec::new(
                "fleetcast_distributor_chunks_total",
                "Chunks of ingested releases, by result: stored (new) or present (already in the store).",
                &["result"],
            )
            .starting_at_zero(&[&["stored"], &["present"]]),
            stored_bytes: Counter::new(
                "fleetcast_distributor_stored_bytes_total",
                "Bytes of new chunks written to the chunk store, as stored (compressed).",
            ),
            rejected: CounterVec::new(
                "fleetcast_distributor_releases_rejected_total",
                "Signed releases refused (release.rejected, or an invalid event), by reason code.",
                &["code"],
            ),
            failures: Counter::new(
                "fleetcast_distributor_ingest_failures_total",
                "Ingest attempts that failed for a transient reason (NATS, the store, a task) and will be retried.",
            ),
        }
    }

    /// One ingest's chunk work, counted when it happened (a retried release whose chunks were
    /// stored by an earlier attempt counts them as present then).
    pub(crate) fn ingested(&self, report: &IngestReport) {
        self.chunks.add(&["stored"], report.new_chunks);
        self.chunks.add(
            &["present"],
            report.chunks.saturating_sub(report.new_chunks),
        );
        self.stored_bytes.add(report.new_stored_bytes);
    }

    pub(crate) fn rejected(&self, code: RejectCode) {
        self.rejected.inc(&[&label_value(&code)]);
    }
}

impl Collect for Metrics {
    fn collect(&self, out: &mut Exposition) {
        self.stored.render(out);
        self.chunks.render(out);
        self.stored_bytes.render(out);
        self.rejected.render(out);
        self.failures.render(out);
    }
}
