//! What the distributor counts, served at `/metrics` on `metrics_listen` with its `/health`.

use fleetcast_events::v1::RejectCode;
use fleetcast_runtime::metrics::{Collect, Counter, CounterVec, Exposition, label_value};
use fleetcast_runtime::observe::Identity;

use crate::IngestReport;
use crate::patches::PatchReport;

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
    patches: Counter,
    patch_bytes: CounterVec,
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
            patches: Counter::new(
                "fleetcast_distributor_patches_total",
                "Binary patches made and listed for rebuilt files.",
            ),
            patch_bytes: CounterVec::new(
                "fleetcast_distributor_patch_bytes_total",
                "Bytes of the patches made (patch), and of the chunks they stand for (chunks).",
                &["kind"],
            )
            .starting_at_zero(&[&["patch"], &["chunks"]]),
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

    pub(crate) fn patched(&self, report: &PatchReport) {
        self.patches.add(report.made);
        self.patch_bytes.add(&["patch"], report.patch_bytes);
        self.patch_bytes.add(&["chunks"], report.delta_bytes);
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
        self.patches.render(out);
        self.patch_bytes.render(out);
    }
}
