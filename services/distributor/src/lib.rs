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
use fleetcast_events::Encoding;
use fleetcast_events::TrustError;
use fleetcast_events::names::{self, RELEASE_SIGNED, RELEASE_STORED, release_key};
use fleetcast_events::v1::*;
use fleetcast_runtime::bus::Role;
use fleetcast_runtime::consume::{
    ConsumerSpec, Outcome, RefusedRelease, Refuser, decode_or_reject, reject_release, run_consumer,
};
use fleetcast_runtime::observe::ObserveError;
use fleetcast_runtime::releases::{FetchError, PipelineBus, RecordError};
use fleetcast_runtime::{Bus, BusError, Trust, TrustBucket, trust};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

pub use ingest::{ChunkStore, IngestError, IngestReport, StoreError, ingest};
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
    let (metrics, endpoint) = metrics::Metrics::registered();
    let starting =
        endpoint.start::<DistributorError, DistributorBus>(SERVICE, &settings, &shutdown);
    let Some((bus, _serving)) = starting.await? else {
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
    /// The release events, records and incoming archives (as every pipeline service).
    bus: PipelineBus,
    chunks: ChunkStore,
    trust: TrustBucket,
}

fleetcast_runtime::bus_role!(DistributorBus => PipelineBus);

impl Role for DistributorBus {
    async fn bind(bus: &Bus) -> Result<Self, BusError> {
        Ok(DistributorBus {
            bus: PipelineBus::bind(bus).await?,
            chunks: ChunkStore::bind(bus).await?,
            trust: TrustBucket::bind(bus).await?,
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

/// Why a signed release was not stored: refused for what it is, or a failure that may pass
/// (see [`ReleaseError::rejection`]).
#[derive(Debug, thiserror::Error)]
enum ReleaseError {
    /// The release record could not be read or written.
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The chunk store could not say whether the release's tree is stored.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// `release.stored` could not be published.
    #[error(transparent)]
    Announce(#[from] BusError),
}

impl ReleaseError {
    /// The refusal of the release this is, or `None` if it may pass and the event is
    /// delivered again: a manifest that does not verify or is for another release, an archive
    /// missing, different, too large, unreadable or not what the manifest names, no room to
    /// fetch it; not the record, the store or NATS failing (even a corrupt chunk in the store
    /// is not the release's fault).
    fn rejection(&self) -> Option<Rejection> {
        match self {
            ReleaseError::Manifest(e) => Some(Rejection {
                code: RejectCode::ManifestMismatch,
                message: e.to_string(),
            }),
            ReleaseError::Fetch(e) => e.rejection(),
            ReleaseError::Ingest(e) => e.rejection().cloned(),
            ReleaseError::Record(_) | ReleaseError::Store(_) | ReleaseError::Announce(_) => None,
        }
    }
}

/// Why a signed manifest is not the one of a release.
#[derive(Debug, thiserror::Error)]
enum ManifestError {
    /// Not signed by the keys trusted now (or expired, or malformed).
    #[error(transparent)]
    Untrusted(#[from] TrustError),
    /// Signed for another app or version than the event's (each as `APP VERSION`).
    #[error("manifest is for {manifest}, the event for {event}")]
    OtherRelease { manifest: String, event: String },
}

impl Distributor {
    async fn handle(&self, msg: &Message) -> Outcome {
        let outcome = match decode_or_reject(&self.bus, SERVICE, msg).await {
            Ok(event) => self.store_release(&event).await,
            Err(outcome) => self.invalid_event(outcome),
        };
        // A release's file list and tree are freed now; give the memory back so the next
        // release (built on other threads, in other arenas) does not add to it.
        fleetcast_runtime::memory::release_freed_soon();
        if matches!(outcome, Outcome::Retry(_)) {
            self.metrics.failures.inc();
        }
        outcome
    }

    /// Stores the release `event` signed, or refuses it.
    #[tracing::instrument(skip_all, fields(app = %event.app, version = %event.version))]
    async fn store_release(&self, event: &ReleaseSigned) -> Outcome {
        match self.ingest_release(event).await {
            Ok(()) => Outcome::Done,
            Err(e) => match e.rejection() {
                Some(r) => self.reject(event, r.code, r.message).await,
                None => Outcome::Retry(e.to_string()),
            },
        }
    }

    /// Stores the release `event` signed and announces it, unless it is stored already.
    async fn ingest_release(&self, event: &ReleaseSigned) -> Result<(), ReleaseError> {
        let record = self
            .bus
            .records
            .release_record(&event.app, &event.version)
            .await?;
        if record.is_some_and(|r| r.state == ReleaseState::Stored) {
            tracing::info!("already stored, nothing to do");
            return Ok(());
        }
        let verified = self.verify(&event.manifest, &event.app, &event.version)?;
        let started = std::time::Instant::now();
        // A release whose tree is stored already (published again) needs no archive.
        let fetched = if self.store.tree_stored(&event.app, &verified.tree).await? {
            None
        } else {
            let fetched = self
                .bus
                .incoming
                .fetch_archive(
                    &event.object,
                    &event.blake3,
                    None,
                    self.settings.limits.max_archive_bytes(),
                    &self.settings.work_dir(),
                )
                .await?;
            Some(fetched)
        };

        let fetch_ms = started.elapsed().as_millis() as u64;
        let report = ingest(
            &self.store,
            fetched.as_ref().map(|f| f.file.path()),
            &verified,
            &self.settings.limits,
            self.settings.concurrency,
        )
        .await?;
        let ingest_ms = started.elapsed().as_millis() as u64 - fetch_ms;
        tracing::info!(fetch_ms, ingest_ms, "release ingested");
        self.metrics.ingested(&report);
        self.finish(event, &report).await?;
        self.metrics.stored.inc();
        Ok(())
    }

    /// Makes the binary patches the tracker asked for (`patches_wanted`).
    async fn patch(&self, msg: &Message) -> Outcome {
        let outcome = match decode_or_reject(&self.bus, SERVICE, msg).await {
            Ok(wanted) => self.make_wanted_patches(&wanted, msg).await,
            Err(outcome) => self.invalid_event(outcome),
        };
        fleetcast_runtime::memory::release_freed_soon();
        outcome
    }

    /// A release or base not stored (or whose record does not verify) is skipped: patches
    /// are an optimisation.
    #[tracing::instrument(skip_all, fields(app = %wanted.app, version = %wanted.version))]
    async fn make_wanted_patches(&self, wanted: &PatchesWanted, msg: &Message) -> Outcome {
        let release = match self.stored_manifest(&wanted.app, &wanted.version).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                tracing::warn!("patches asked for a release not stored: none made");
                return Outcome::Done;
            }
            Err(e) => return Outcome::Retry(e.to_string()),
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
                Ok(None) => tracing::info!(base = %version, "base not stored: no patches from it"),
                Err(e) => return Outcome::Retry(e.to_string()),
            }
        }
        let started = std::time::Instant::now();
        match make_patches(&self.store, &release, &bases, &self.settings.patches).await {
            Ok(report) => {
                tracing::info!(
                    bases = bases.len(),
                    made = report.made,
                    patch_bytes = report.patch_bytes,
                    chunk_bytes = report.delta_bytes,
                    ms = started.elapsed().as_millis() as u64,
                    "patches made"
                );
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
                    tracing::warn!(error = %e, delivered, "patches given up; hosts fetch chunks");
                    Outcome::Done
                } else {
                    Outcome::RetryAfter(e.to_string(), std::time::Duration::from_secs(30))
                }
            }
        }
    }

    /// The verified manifest of a stored release; `None` if it is not stored or its record
    /// does not verify.
    async fn stored_manifest(
        &self,
        app: &str,
        version: &semver::Version,
    ) -> Result<Option<fleetcast_events::VerifiedManifest>, RecordError> {
        let record = self.bus.records.release_record(app, version).await?;
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
                tracing::warn!(release = %version, %reason, "stored release does not verify: no patches with it");
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
    ) -> Result<fleetcast_events::VerifiedManifest, ManifestError> {
        let now = OffsetDateTime::now_utc();
        let verified = self
            .trusted
            .keys(now)
            .and_then(|keys| signed.verify(&keys, now))?;
        if verified.app != app || verified.version != *version {
            return Err(ManifestError::OtherRelease {
                manifest: format!("{} {}", verified.app, verified.version),
                event: format!("{app} {version}"),
            });
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
    async fn finish(
        &self,
        event: &ReleaseSigned,
        report: &IngestReport,
    ) -> Result<(), ReleaseError> {
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
            .await?;
        let msg_id = format!("stored.{key}");
        self.bus
            .publish_event(RELEASE_STORED, &stored, Encoding::MsgPack, Some(&msg_id))
            .await?;
        if let Err(e) = self.bus.incoming.delete(&event.object).await {
            tracing::warn!(object = %event.object, error = %e, "stored, but the incoming archive was not deleted");
        }
        tracing::info!(
            chunks = report.chunks,
            new_chunks = report.new_chunks,
            new_stored_bytes = report.new_stored_bytes,
            "release stored"
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::StoreError;

    /// The nak-or-reject of a signed release: what the release is (a manifest that is not
    /// its own, an archive missing, too large or not what was signed) is refused; the record,
    /// the store or NATS failing is tried again, even when what the store holds is corrupt.
    #[test]
    fn what_the_release_is_is_refused_and_a_failure_that_may_pass_is_retried() {
        let code = |e: ReleaseError| e.rejection().map(|r| r.code);
        let other = ManifestError::OtherRelease {
            manifest: "web 1.0.0".into(),
            event: "api 1.0.0".into(),
        };
        assert_eq!(code(other.into()), Some(RejectCode::ManifestMismatch));
        let expired = ManifestError::Untrusted(TrustError::Expired("yesterday".into()));
        assert_eq!(code(expired.into()), Some(RejectCode::ManifestMismatch));
        let too_large = FetchError::TooLarge {
            object: "web.zip".into(),
            size: 2,
            limit: 1,
        };
        assert_eq!(code(too_large.into()), Some(RejectCode::TooLarge));
        let mismatch = IngestError::Rejected(Rejection {
            code: RejectCode::ManifestMismatch,
            message: "the archive's files make another tree".into(),
        });
        assert_eq!(code(mismatch.into()), Some(RejectCode::ManifestMismatch));

        let record = RecordError::Store {
            bucket: "releases",
            key: "web.1.0.0".into(),
            reason: "timed out".into(),
        };
        assert_eq!(code(record.into()), None);
        let unreachable = FetchError::Transient {
            object: "web.zip".into(),
            reason: "timed out".into(),
        };
        assert_eq!(code(unreachable.into()), None);
        let corrupt = StoreError::Corrupt {
            what: "chunk 00".into(),
            reason: "not what its name says".into(),
        };
        assert_eq!(code(IngestError::Store(corrupt.clone()).into()), None);
        assert_eq!(code(corrupt.into()), None);
        assert_eq!(code(IngestError::NoArchive.into()), None);
        let announce = BusError::Publish {
            subject: RELEASE_STORED.into(),
            reason: "no responders".into(),
        };
        assert_eq!(code(announce.into()), None);
    }
}
