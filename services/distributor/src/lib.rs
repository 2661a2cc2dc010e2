//! The distributor: for each signed release, builds the release's tree from the archive, checks
//! it has the root the signer signed, stores the chunks and tree nodes the store lacks
//! (content-addressed, compressed), then announces `release.stored`. All instances share one durable consumer (one queue group), and
//! a release already stored is a no-op.

mod ingest;
mod metrics;
mod patches;
mod settings;

use std::sync::Arc;

use async_nats::jetstream::Message;
use async_nats::jetstream::stream;
use fleetcast_events::Encoding;
use fleetcast_events::names::{self, RELEASE_SIGNED, RELEASE_STORED, release_key};
use fleetcast_events::v1::*;
use fleetcast_runtime::bus::Role;
use fleetcast_runtime::consume::{
    ConsumerSpec, Outcome, RefusedRelease, Refuser, decode_or_reject, reject_release, run_consumer,
};
use fleetcast_runtime::observe::{self, Endpoint, ObserveError};
use fleetcast_runtime::{Bus, BusError, Incoming, Records, Trust, TrustBucket, trust};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

pub use ingest::{ChunkStore, IngestError, IngestReport, ingest};
pub use patches::{PatchReport, make_patches};
pub use settings::{PatchSettings, Settings};

pub const SERVICE: &str = "distributor";

/// Deliveries of a `patches_wanted` job before its patches are given up.
const PATCH_ATTEMPTS: i64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum DistributorError {
    #[error(transparent)]
    Settings(#[from] fleetcast_runtime::SettingsError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Observe(#[from] ObserveError),
}

pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), DistributorError> {
    settings.validate()?;
    let trusted = settings.trusted()?;
    let metrics = Arc::new(metrics::Metrics::new());
    let endpoint = Endpoint::new(metrics::IDENTITY, metrics.clone());
    let Some((bus, _serving)) = observe::serve_and_connect::<DistributorError, DistributorBus>(
        SERVICE,
        &settings.nats,
        settings.metrics_listen,
        settings.metrics_tls.as_ref(),
        endpoint,
        &shutdown,
    )
    .await?
    else {
        return Ok(());
    };
    let trusted = Arc::new(trusted);
    let following = trusted.clone().start_following(bus.trust.clone()).await;
    let following = tokio::spawn(following.run(trust::SERVICE_RECHECK, shutdown.clone()));
    let distributor = Distributor {
        store: bus.chunks.clone(),
        bus: bus.clone(),
        settings: Arc::new(settings),
        trusted,
        metrics,
    };
    // Patches, asked for once a release is stored, are made beside the next releases' ingest.
    let patcher = distributor.clone();
    let (stream, stop) = (bus.releases_stream.clone(), shutdown.clone());
    // Boxed, as both run side by side in this task: their futures are large.
    let patching = Box::pin(async move {
        if !patcher.settings.patches.enabled {
            return Ok(());
        }
        let spec = ConsumerSpec {
            durable: names::DISTRIBUTOR_PATCHES_CONSUMER,
            filter_subject: names::PATCHES_WANTED,
            ack_wait: patcher.settings.ack_wait,
        };
        run_consumer(&stream, spec, stop, move |msg| {
            let d = patcher.clone();
            async move { d.patch(&msg).await }
        })
        .await
    });
    let spec = ConsumerSpec {
        durable: names::DISTRIBUTOR_CONSUMER,
        filter_subject: RELEASE_SIGNED,
        ack_wait: distributor.settings.ack_wait,
    };
    let ingesting = Box::pin(run_consumer(
        &bus.releases_stream,
        spec,
        shutdown.clone(),
        |msg| {
            let d = distributor.clone();
            async move { d.handle(&msg).await }
        },
    ));
    let (ingested, patched) = tokio::join!(ingesting, patching);
    if let Err(e) = patched {
        tracing::warn!(error = %e, "patch consumer stopped");
    }
    ingested?;
    let _ = following.await;
    Ok(())
}

/// What the distributor uses of the bus: the release events (signed releases and patch
/// requests in, stored releases and refusals out), the release records, the incoming archives,
/// the chunk store, and the trust bucket (roots read).
#[derive(Clone)]
struct DistributorBus {
    bus: Bus,
    releases_stream: stream::Stream,
    records: Records,
    incoming: Incoming,
    chunks: ChunkStore,
    trust: TrustBucket,
}

fleetcast_runtime::bus_role!(DistributorBus);

impl Role for DistributorBus {
    async fn bind(bus: &Bus) -> Result<Self, BusError> {
        Ok(DistributorBus {
            releases_stream: bus.stream(names::RELEASES_STREAM).await?,
            records: bus.records().await?,
            incoming: bus.incoming().await?,
            chunks: ChunkStore::bind(bus).await?,
            trust: TrustBucket::bind(bus).await?,
            bus: bus.clone(),
        })
    }
}

#[derive(Clone)]
struct Distributor {
    bus: DistributorBus,
    settings: Arc<Settings>,
    trusted: Arc<Trust>,
    store: ChunkStore,
    metrics: Arc<metrics::Metrics>,
}

impl Distributor {
    async fn handle(&self, msg: &Message) -> Outcome {
        let outcome = self.store_release(msg).await;
        // A release's file list and tree are freed now; give the memory back so the next
        // release (built on other threads, in other arenas) does not add to it.
        fleetcast_runtime::memory::release_freed_soon();
        if matches!(outcome, Outcome::Retry(_)) {
            self.metrics.failures.inc();
        }
        outcome
    }

    async fn store_release(&self, msg: &Message) -> Outcome {
        let event: ReleaseSigned = match decode_or_reject(&self.bus, SERVICE, msg).await {
            Ok(e) => e,
            Err(outcome) => return self.invalid_event(outcome),
        };
        let record = match self
            .bus
            .records
            .release_record(&event.app, &event.version)
            .await
        {
            Ok(r) => r,
            Err(e) => return Outcome::Retry(e.to_string()),
        };
        if record
            .as_ref()
            .is_some_and(|r| r.state == ReleaseState::Stored)
        {
            tracing::info!(app = %event.app, version = %event.version, "already stored, nothing to do");
            return Outcome::Done;
        }
        let verified = match self.verify(&event.manifest, &event.app, &event.version) {
            Ok(v) => v,
            Err(message) => {
                return self
                    .reject(&event, RejectCode::ManifestMismatch, message)
                    .await;
            }
        };
        let started = std::time::Instant::now();
        // A release whose tree is stored already (published again) needs no archive.
        let stored = match self.store.tree_stored(&event.app, &verified.tree).await {
            Ok(stored) => stored,
            Err(e) => return Outcome::Retry(e.to_string()),
        };
        let fetched = if !stored {
            let work_dir = self.settings.work_dir();
            match self
                .bus
                .incoming
                .fetch_archive(
                    &event.object,
                    &event.blake3,
                    None,
                    self.settings.limits.max_archive_bytes(),
                    &work_dir,
                )
                .await
            {
                Ok(f) => Some(f),
                Err(e) => match e.rejection() {
                    Some(r) => return self.reject(&event, r.code, r.message).await,
                    None => return Outcome::Retry(e.to_string()),
                },
            }
        } else {
            None
        };
        let fetch_ms = started.elapsed().as_millis() as u64;
        let report = match ingest(
            &self.store,
            fetched.as_ref().map(|f| f.file.path()),
            &verified,
            &self.settings.limits,
            self.settings.concurrency,
        )
        .await
        {
            Ok(r) => r,
            Err(IngestError::Rejected(r)) => return self.reject(&event, r.code, r.message).await,
            Err(IngestError::Transient(e)) => return Outcome::Retry(e),
            Err(IngestError::Store(e)) => return Outcome::Retry(e.to_string()),
        };
        let ingest_ms = started.elapsed().as_millis() as u64 - fetch_ms;
        tracing::info!(app = %event.app, version = %event.version, fetch_ms, ingest_ms, "release ingested");
        self.metrics.ingested(&report);
        match self.finish(&event, &report).await {
            Ok(()) => {
                self.metrics.stored.inc();
                Outcome::Done
            }
            Err(e) => Outcome::Retry(e),
        }
    }

    /// Makes the binary patches the tracker asked for (`patches_wanted`). A release or base not
    /// stored (or whose record does not verify) is skipped: patches are an optimisation.
    async fn patch(&self, msg: &Message) -> Outcome {
        let wanted: PatchesWanted = match decode_or_reject(&self.bus, SERVICE, msg).await {
            Ok(e) => e,
            Err(outcome) => return self.invalid_event(outcome),
        };
        let release = match self.stored_manifest(&wanted.app, &wanted.version).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                tracing::warn!(app = %wanted.app, version = %wanted.version, "patches asked for a release not stored: none made");
                return Outcome::Done;
            }
            Err(e) => return Outcome::Retry(e),
        };
        let mut bases = Vec::new();
        for version in wanted
            .bases
            .iter()
            .filter(|v| **v != wanted.version)
            .take(self.settings.patches.max_bases)
        {
            match self.stored_manifest(&wanted.app, version).await {
                Ok(Some(m)) => bases.push(m),
                Ok(None) => {
                    tracing::info!(app = %wanted.app, base = %version, "base not stored: no patches from it")
                }
                Err(e) => return Outcome::Retry(e),
            }
        }
        let started = std::time::Instant::now();
        let outcome = match make_patches(&self.store, &release, &bases, &self.settings.patches)
            .await
        {
            Ok(report) => {
                tracing::info!(app = %wanted.app, version = %wanted.version, bases = bases.len(),
                        made = report.made, patch_bytes = report.patch_bytes, chunk_bytes = report.delta_bytes,
                        ms = started.elapsed().as_millis() as u64, "patches made");
                self.metrics.patched(&report);
                Outcome::Done
            }
            // Patches only save bytes: a job that cannot succeed (a base's objects gone from
            // the store or corrupt) is given up at once, one that keeps failing (a store that
            // keeps refusing) after a few tries, rather than hold up the patches of the
            // releases after it.
            Err(e) => {
                let delivered = msg.info().map_or(1, |i| i.delivered);
                if !e.is_transient() || delivered >= PATCH_ATTEMPTS {
                    tracing::warn!(app = %wanted.app, version = %wanted.version, error = %e, delivered,
                        "patches given up; hosts fetch chunks");
                    Outcome::Done
                } else {
                    Outcome::RetryAfter(e.to_string(), std::time::Duration::from_secs(30))
                }
            }
        };
        fleetcast_runtime::memory::release_freed_soon();
        outcome
    }

    /// The verified manifest of a stored release; `None` if it is not stored or its record
    /// does not verify.
    async fn stored_manifest(
        &self,
        app: &str,
        version: &semver::Version,
    ) -> Result<Option<fleetcast_events::VerifiedManifest>, String> {
        let record =
            (self.bus.records.release_record(app, version).await).map_err(|e| e.to_string())?;
        let Some(record) = record else {
            return Ok(None);
        };
        let Some(signed) = record
            .manifest
            .filter(|_| record.state == ReleaseState::Stored)
        else {
            return Ok(None);
        };
        match self.verify(&signed, app, version) {
            Ok(v) => Ok(Some(v)),
            Err(reason) => {
                tracing::warn!(app, %version, %reason, "stored release does not verify: no patches with it");
                Ok(None)
            }
        }
    }

    /// A signed manifest checked against the trusted keys now, and that it is for `app`
    /// `version`; why not, otherwise.
    fn verify(
        &self,
        signed: &fleetcast_events::SignedManifest,
        app: &str,
        version: &semver::Version,
    ) -> Result<fleetcast_events::VerifiedManifest, String> {
        let now = OffsetDateTime::now_utc();
        let verified = self
            .trusted
            .keys(now)
            .and_then(|keys| signed.verify(&keys, now))
            .map_err(|e| e.to_string())?;
        if verified.app != app || verified.version != *version {
            return Err(format!(
                "manifest is for {} {}, the event for {app} {version}",
                verified.app, verified.version
            ));
        }
        Ok(verified)
    }

    /// Counts a signed release refused as an invalid event once the refusal is published.
    fn invalid_event(&self, outcome: Outcome) -> Outcome {
        if matches!(outcome, Outcome::Done) {
            self.metrics.rejected(RejectCode::InvalidEvent);
        }
        outcome
    }

    /// Record, event, in that order: each step is repeatable.
    async fn finish(&self, event: &ReleaseSigned, report: &IngestReport) -> Result<(), String> {
        let key = release_key(&event.app, &event.version);
        let stored = ReleaseStored {
            app: event.app.clone(),
            version: event.version.clone(),
            files: report.files,
            total_bytes: report.total_bytes,
            chunks: report.chunks,
            new_chunks: report.new_chunks,
            new_stored_bytes: report.new_stored_bytes,
            tree_nodes: report.tree_nodes,
            new_tree_nodes: report.new_tree_nodes,
        };
        // The record first: whoever reacts to `release.stored` (the tracker) finds it stored.
        self.bus
            .records
            .put_release_record(&ReleaseRecord {
                app: event.app.clone(),
                version: event.version.clone(),
                state: ReleaseState::Stored,
                blake3: Some(event.blake3.clone()),
                reason: None,
                manifest: Some(event.manifest.clone()),
                stored: Some(stored.clone()),
                updated: OffsetDateTime::now_utc(),
            })
            .await
            .map_err(|e| e.to_string())?;
        let msg_id = format!("stored.{key}");
        self.bus
            .publish_event(RELEASE_STORED, &stored, Encoding::MsgPack, Some(&msg_id))
            .await
            .map_err(|e| e.to_string())?;
        if let Err(e) = self.bus.incoming.delete(&event.object).await {
            tracing::warn!(object = %event.object, error = %e, "stored, but the incoming archive was not deleted");
        }
        tracing::info!(
            app = %event.app, version = %event.version, chunks = report.chunks, new_chunks = report.new_chunks,
            new_stored_bytes = report.new_stored_bytes, "release stored"
        );
        Ok(())
    }

    async fn reject(&self, event: &ReleaseSigned, code: RejectCode, message: String) -> Outcome {
        let release = RefusedRelease {
            app: &event.app,
            version: &event.version,
            blake3: &event.blake3,
            archive: None,
        };
        let reason = Rejection { code, message };
        let outcome = reject_release(
            Refuser {
                stage: SERVICE,
                bus: &self.bus,
                records: &self.bus.records,
                incoming: &self.bus.incoming,
            },
            release,
            reason,
            true,
        )
        .await;
        if matches!(outcome, Outcome::Done) {
            self.metrics.rejected(code);
        }
        outcome
    }
}

/// The `fleetcast-distributor` program: its settings from its config file and environment, run until
/// a signal. (Also what the `fleetcast` binary runs when called by this name: the container
/// image's multi-call binary.)
pub fn main() -> std::process::ExitCode {
    // Consecutive large releases reuse one another's freed memory (see `limit_arenas`), and
    // release their large lists when done (`map_large_blocks`).
    fleetcast_runtime::memory::limit_arenas(2);
    fleetcast_runtime::memory::map_large_blocks();
    fleetcast_runtime::service::service_main(
        SERVICE,
        Settings::LIST_KEYS,
        fleetcast_runtime::service::Threads::PerCore,
        run,
    )
}
