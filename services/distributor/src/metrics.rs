//! What the distributor counts, served at `/metrics` on `metrics_listen` with its `/health`.

use std::sync::Arc;

use fleetcast_events::v1::RejectCode;
use fleetcast_runtime::metrics::{CounterFamily, counter, label_value};
use fleetcast_runtime::observe::{Endpoint, Identity};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use crate::IngestReport;
use crate::patches::PatchReport;

pub(crate) const IDENTITY: Identity = Identity {
    build_info: "fleetcast_distributor_build_info",
    nats_connected: "fleetcast_distributor_nats_connected",
    version: env!("CARGO_PKG_VERSION"),
};

pub(crate) struct Metrics {
    pub(crate) stored: Counter,
    chunks: CounterFamily<1>,
    stored_bytes: Counter,
    rejected: CounterFamily<1>,
    pub(crate) failures: Counter,
    patches: Counter,
    patch_bytes: CounterFamily<1>,
}

impl Metrics {
    /// The distributor's counters, and the endpoint serving them (with its identity).
    pub(crate) fn registered() -> (Arc<Self>, Arc<Endpoint>) {
        let mut registry = Registry::default();
        let r = &mut registry;
        let metrics = Metrics {
            stored: counter(
                r,
                "fleetcast_distributor_releases_stored_total",
                "Releases stored by this instance: chunks, chunk index, record and release.stored.",
            ),
            chunks: CounterFamily::new(
                r,
                "fleetcast_distributor_chunks_total",
                "Chunks of ingested releases, by result: stored (new) or present (already in the store).",
                ["result"],
            )
            .starting_at_zero(&[["stored"], ["present"]]),
            stored_bytes: counter(
                r,
                "fleetcast_distributor_stored_bytes_total",
                "Bytes of new chunks written to the chunk store, as stored (compressed).",
            ),
            rejected: CounterFamily::new(
                r,
                "fleetcast_distributor_releases_rejected_total",
                "Signed releases refused (release.rejected, or an invalid event), by reason code.",
                ["code"],
            ),
            failures: counter(
                r,
                "fleetcast_distributor_ingest_failures_total",
                "Ingest attempts that failed for a transient reason (NATS, the store, a task) and will be retried.",
            ),
            patches: counter(
                r,
                "fleetcast_distributor_patches_total",
                "Binary patches made and listed for rebuilt files.",
            ),
            patch_bytes: CounterFamily::new(
                r,
                "fleetcast_distributor_patch_bytes_total",
                "Bytes of the patches made (patch), and of the chunks they stand for (chunks).",
                ["kind"],
            )
            .starting_at_zero(&[["patch"], ["chunks"]]),
        };
        (Arc::new(metrics), Endpoint::new(IDENTITY, registry))
    }

    /// One ingest's chunk work, counted when it happened (a retried release whose chunks were
    /// stored by an earlier attempt counts them as present then).
    pub(crate) fn ingested(&self, report: &IngestReport) {
        self.chunks.add(&["stored"], report.new_chunks);
        self.chunks.add(
            &["present"],
            report.chunks.saturating_sub(report.new_chunks),
        );
        self.stored_bytes.inc_by(report.new_stored_bytes);
    }

    pub(crate) fn patched(&self, report: &PatchReport) {
        self.patches.inc_by(report.made);
        self.patch_bytes.add(&["patch"], report.patch_bytes);
        self.patch_bytes.add(&["chunks"], report.delta_bytes);
    }

    pub(crate) fn rejected(&self, code: RejectCode) {
        self.rejected.inc(&[label_value(&code).as_str()]);
    }
}
