//! The watcher: turns a complete `NAME-VERSION.zip` in the drop folder, or a release CI
//! published, into a validated archive in the incoming store and a `package.detected` event.
//! A package it refuses gets a `package.rejected` event with the reason; a dropped file is then
//! moved to `rejected/` so it is not retried forever.

mod drop_folder;
mod metrics;
mod settings;

use std::path::Path;
use std::sync::Arc;

use async_nats::jetstream::object_store::DeleteErrorKind;
use async_nats::jetstream::stream;
use fleetcast_events::names::{self, PACKAGE_DETECTED, PACKAGE_REJECTED, RELEASE_PUBLISHED};
use fleetcast_events::v1::{
    PackageDetected, PackageRejected, PackageSource, RejectCode, Rejection, ReleasePublished,
};
use fleetcast_events::{AppName, Encoding};
use fleetcast_package::{ArchiveError, ArchiveLimits, Package};
use fleetcast_runtime::bus::Role;
use fleetcast_runtime::consume::{ConsumerSpec, Outcome, decode, reject_event, run_consumer};
use fleetcast_runtime::observe::{self, Endpoint, ObserveError};
use fleetcast_runtime::releases::FetchError;
use fleetcast_runtime::{Bus, BusError, Incoming, Records};
use semver::Version;
use tokio_util::sync::CancellationToken;

pub use settings::Settings;

pub const SERVICE: &str = "watcher";

#[derive(Debug, thiserror::Error)]
pub enum WatcherError {
    #[error(transparent)]
    Settings(#[from] fleetcast_runtime::SettingsError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Observe(#[from] ObserveError),
    #[error("cannot watch drop folder {path}: {reason}")]
    Watch { path: String, reason: String },
}

pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), WatcherError> {
    settings.validate()?;
    let metrics = Arc::new(metrics::Metrics::new());
    let endpoint = Endpoint::new(metrics::IDENTITY, metrics.clone());
    let Some((bus, _serving)) = observe::serve_and_connect::<WatcherError, WatcherBus>(
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
    let watcher = Watcher {
        bus,
        settings: Arc::new(settings),
        metrics,
    };
    let ci = {
        let w = watcher.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { w.consume_ci_releases(shutdown).await })
    };
    let folder = drop_folder::watch(watcher.clone(), shutdown.clone()).await;
    shutdown.cancel();
    match ci.await {
        Ok(result) => result?,
        Err(e) => tracing::error!(error = %e, "CI consumer task failed"),
    }
    folder
}

/// What the watcher uses of the bus: the release events (CI's announcements in, its own out),
/// the release records (its refusals), the incoming archives.
#[derive(Clone)]
pub(crate) struct WatcherBus {
    bus: Bus,
    releases_stream: stream::Stream,
    records: Records,
    incoming: Incoming,
}

fleetcast_runtime::bus_role!(WatcherBus);

impl Role for WatcherBus {
    async fn bind(bus: &Bus) -> Result<Self, BusError> {
        Ok(WatcherBus {
            releases_stream: bus.stream(names::RELEASES_STREAM).await?,
            records: bus.records().await?,
            incoming: bus.incoming().await?,
            bus: bus.clone(),
        })
    }
}

#[derive(Clone)]
pub(crate) struct Watcher {
    bus: WatcherBus,
    settings: Arc<Settings>,
    metrics: Arc<metrics::Metrics>,
}

/// What validation found out about an archive file.
pub(crate) struct Inspected {
    pub size: u64,
    pub blake3: String,
}

/// Validates an archive's structure against the limits and hashes the whole file.
pub(crate) fn inspect(path: &Path, limits: &ArchiveLimits) -> Result<Inspected, ArchiveError> {
    // The package's own fleetcast.toml is checked here so a bad one fails CI, not hosts.
    Package::open(path, limits)?.config()?;
    let mut hasher = blake3::Hasher::new();
    let size = hasher.update_reader(std::fs::File::open(path)?)?.count();
    Ok(Inspected {
        size,
        blake3: hasher.finalize().to_hex().to_string(),
    })
}

/// The incoming-store object a published event names, read leniently from an event that does
/// not decode as a whole: its `object` field, else the name its `app`, `version` and `blake3`
/// give (how the CLI names uploads). Only a name the store could hold an archive under
/// (`*.zip`, no path) is taken.
fn archive_named_by(msg: &async_nats::jetstream::Message) -> Option<String> {
    let value: serde_json::Value = decode(msg).ok()?;
    let field = |name: &str| value.get(name).and_then(serde_json::Value::as_str);
    let object = match field("object") {
        Some(object) => object.to_string(),
        None => {
            let version = Version::parse(field("version")?).ok()?;
            names::archive_object(field("app")?, &version, field("blake3")?)
        }
    };
    let plausible = object.len() > ".zip".len()
        && object.ends_with(".zip")
        && !object.contains(['/', '\\'])
        && !object.starts_with('.');
    plausible.then_some(object)
}

impl Watcher {
    async fn consume_ci_releases(&self, shutdown: CancellationToken) -> Result<(), BusError> {
        let spec = ConsumerSpec {
            durable: names::WATCHER_CONSUMER,
            filter_subject: RELEASE_PUBLISHED,
            ack_wait: self.settings.ack_wait,
        };
        let stream = self.bus.releases_stream.clone();
        run_consumer(&stream, spec, shutdown, |msg| async move {
            self.handle_ci_release(&msg).await
        })
        .await
    }

    async fn handle_ci_release(&self, msg: &async_nats::jetstream::Message) -> Outcome {
        let event: ReleasePublished = match decode(msg) {
            Ok(e) => e,
            Err(e) => return self.reject_undecodable(msg, e.to_string()).await,
        };
        let source = PackageSource::Ci {
            published_by: event.published_by.clone(),
        };
        let reject = |code, message: String| Rejection { code, message };
        // From here on, every refusal removes the archive the event names: no other event will
        // ever name it, so it would stay in the incoming store for good.
        let app = match AppName::try_from(event.app.as_str()) {
            Ok(app) => app,
            Err(e) => {
                let reason = reject(RejectCode::InvalidName, e.to_string());
                return self
                    .reject_ci(&event, None, reason, Some(&event.object))
                    .await;
            }
        };
        let expected = names::archive_object(&app, &event.version, &event.blake3);
        if event.object != expected || event.blake3.len() != 64 {
            let message = format!(
                "object must be named {expected:?} after the archive's BLAKE3, got {:?}",
                event.object
            );
            return self
                .reject_ci(
                    &event,
                    Some(&app),
                    reject(RejectCode::InvalidEvent, message),
                    Some(&event.object),
                )
                .await;
        }
        let work_dir = self.settings.work_dir();
        let fetched = match self
            .bus
            .incoming
            .fetch_archive(
                &event.object,
                &event.blake3,
                Some(event.size),
                self.settings.limits.max_archive_bytes(),
                &work_dir,
            )
            .await
        {
            Ok(f) => f,
            Err(e) => match e.rejection() {
                // A different, too large or unfetchable archive is removed; a missing one has
                // nothing to remove.
                Some(r) => {
                    let object =
                        (!matches!(e, FetchError::NotFound(_))).then_some(event.object.as_str());
                    return self.reject_ci(&event, Some(&app), r, object).await;
                }
                None => return Outcome::Retry(e.to_string()),
            },
        };
        let limits = self.settings.limits.clone();
        let path = fetched.file.path().to_path_buf();
        match tokio::task::spawn_blocking(move || Package::open(&path, &limits).map(|_| ())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return self
                    .reject_ci(&event, Some(&app), e.rejection(), Some(&event.object))
                    .await;
            }
            Err(e) => return Outcome::Retry(format!("validation task failed: {e}")),
        }
        let detected = PackageDetected {
            app,
            version: event.version,
            object: event.object,
            size: fetched.size,
            blake3: fetched.blake3,
            source,
        };
        match self.announce(&detected).await {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::Retry(e.to_string()),
        }
    }

    /// Refuses a published event that does not decode (`event_rejected`), after removing the
    /// archive it names, when it names one: the CLI uploads before it publishes, so a refused
    /// event would otherwise leave its archive in the incoming store, which nothing else would
    /// ever clean (past `nats.quotas.incoming_max_age`).
    async fn reject_undecodable(
        &self,
        msg: &async_nats::jetstream::Message,
        decode_error: String,
    ) -> Outcome {
        let mut message = decode_error;
        if let Some(object) = archive_named_by(msg) {
            match self.bus.incoming.delete(&object).await {
                Ok(()) => message.push_str(&format!(
                    "; archive {object:?} removed from the incoming store"
                )),
                // Never uploaded, already gone, or no name the store takes: nothing to clean.
                Err(e)
                    if matches!(
                        e.kind(),
                        DeleteErrorKind::NotFound | DeleteErrorKind::InvalidName
                    ) => {}
                Err(e) => return Outcome::Retry(format!("cannot delete archive {object}: {e}")),
            }
        }
        let reason = Rejection {
            code: RejectCode::InvalidEvent,
            message,
        };
        let outcome = reject_event(&self.bus, SERVICE, &msg.subject, reason).await;
        if matches!(outcome, Outcome::Done) {
            self.metrics.rejected(RejectCode::InvalidEvent);
        }
        outcome
    }

    /// Publishes `package.detected`, idempotently (the message id names the exact archive).
    async fn announce(&self, detected: &PackageDetected) -> Result<(), BusError> {
        let msg_id = format!("detected.{}", detected.object);
        self.bus
            .publish_event(PACKAGE_DETECTED, detected, Encoding::MsgPack, Some(&msg_id))
            .await?;
        self.metrics.detected(&detected.source);
        tracing::info!(app = %detected.app, version = %detected.version, object = %detected.object, "package detected");
        Ok(())
    }

    /// Rejects a release CI published (removing `object` from the store when given).
    /// Refuses the release `event` announced; `app`: its app, when the name is one.
    async fn reject_ci(
        &self,
        event: &ReleasePublished,
        app: Option<&AppName>,
        reason: Rejection,
        object: Option<&str>,
    ) -> Outcome {
        let source = PackageSource::Ci {
            published_by: event.published_by.clone(),
        };
        self.reject_package(
            app,
            Some(&event.version),
            source,
            reason,
            object,
            Some(&event.blake3),
        )
        .await
    }

    /// Publishes `package.rejected`, records the rejection, and removes the uploaded archive so
    /// nothing is kept for a refused package.
    async fn reject_package(
        &self,
        app: Option<&AppName>,
        version: Option<&Version>,
        source: PackageSource,
        reason: Rejection,
        object: Option<&str>,
        blake3: Option<&str>,
    ) -> Outcome {
        tracing::warn!(app = ?app, version = ?version.map(|v| v.to_string()), code = %reason.code, reason = %reason.message, "package rejected");
        if let Some(object) = object
            && let Err(e) = self.bus.incoming.delete(object).await
        {
            tracing::warn!(%object, error = %e, "cannot delete rejected archive");
        }
        if let (Some(app), Some(version)) = (app, version)
            && let Err(e) = self
                .bus
                .records
                .record_rejection(app, version, blake3, &reason, false)
                .await
        {
            return Outcome::Retry(e.to_string());
        }
        let code = reason.code;
        let event = PackageRejected {
            app: app.cloned(),
            version: version.cloned(),
            source,
            reason,
            blake3: blake3.map(String::from),
        };
        match self
            .bus
            .publish_event(PACKAGE_REJECTED, &event, Encoding::Json, None)
            .await
        {
            Ok(()) => {
                self.metrics.rejected(code);
                Outcome::Done
            }
            Err(e) => Outcome::Retry(e.to_string()),
        }
    }
}

/// The `fleetcast-watcher` program: its settings from its config file and environment, run until
/// a signal. (Also what the `fleetcast` binary runs when called by this name: the container
/// image's multi-call binary.)
pub fn main() -> std::process::ExitCode {
    fleetcast_runtime::service::service_main(
        SERVICE,
        &[],
        fleetcast_runtime::service::Threads::PerCore,
        run,
    )
}
