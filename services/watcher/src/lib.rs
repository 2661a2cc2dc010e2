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
use fleetcast_events::names::{self, PACKAGE_DETECTED, PACKAGE_REJECTED, RELEASE_PUBLISHED};
use fleetcast_events::v1::{
    PackageDetected, PackageRejected, PackageSource, RejectCode, Rejection, ReleasePublished,
};
use fleetcast_events::{AppName, DecodeError, Encoding};
use fleetcast_package::{ArchiveError, ArchiveLimits, Package};
use fleetcast_runtime::BusError;
use fleetcast_runtime::consume::{ConsumerSpec, Outcome, decode, reject_event, run_consumer};
use fleetcast_runtime::observe::ObserveError;
use fleetcast_runtime::releases::{FetchError, PipelineBus};
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

impl WatcherError {
    fn watch(path: &Path, reason: impl std::fmt::Display) -> Self {
        WatcherError::Watch {
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }
}

pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), WatcherError> {
    settings.validate()?;
    let (metrics, endpoint) = metrics::Metrics::registered();
    let starting = endpoint.start::<WatcherError, WatcherBus>(SERVICE, &settings, &shutdown);
    let Some((bus, _serving)) = starting.await? else {
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
pub(crate) type WatcherBus = PipelineBus;

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

/// The app of a release CI published, when its name is one and the event names the archive
/// as uploads are named (after the archive's BLAKE3); otherwise the refusal, with the app
/// when its name is one.
fn published_app(event: &ReleasePublished) -> Result<AppName, (Option<AppName>, Rejection)> {
    let app = AppName::try_from(event.app.as_str()).map_err(|e| {
        let reason = Rejection {
            code: RejectCode::InvalidName,
            message: e.to_string(),
        };
        (None, reason)
    })?;
    let expected = names::archive_object(&app, &event.version, &event.blake3);
    if event.object != expected || event.blake3.len() != 64 {
        let reason = Rejection {
            code: RejectCode::InvalidEvent,
            message: format!(
                "object must be named {expected:?} after the archive's BLAKE3, got {:?}",
                event.object
            ),
        };
        return Err((Some(app), reason));
    }
    Ok(app)
}

/// Why the archive of a release CI published was not validated.
#[derive(Debug, thiserror::Error)]
enum CiError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Invalid(#[from] ArchiveError),
    #[error("validation task failed: {0}")]
    Validation(tokio::task::JoinError),
}

/// A release refused for what it is (not for a failure that may pass).
#[derive(Debug, PartialEq)]
struct Refusal {
    reason: Rejection,
    /// Whether the archive the event names is removed: not when it is not in the store.
    remove_archive: bool,
}

impl CiError {
    /// The refusal this failure is, or `None` if it may pass and the event is tried again
    /// (the store unreachable, a task lost).
    fn refusal(&self) -> Option<Refusal> {
        match self {
            // A different, too large or unfetchable archive is removed; a missing one has
            // nothing to remove.
            CiError::Fetch(e) => e.rejection().map(|reason| Refusal {
                reason,
                remove_archive: !matches!(e, FetchError::NotFound(_)),
            }),
            CiError::Invalid(e) => Some(Refusal {
                reason: e.rejection(),
                remove_archive: true,
            }),
            CiError::Validation(_) => None,
        }
    }
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
        match decode::<ReleasePublished>(msg) {
            Ok(event) => self.take_ci_release(&event).await,
            Err(e) => self.reject_undecodable(msg, e).await,
        }
    }

    /// Announces the release `event` names once its archive is fetched and valid, or refuses
    /// it. Every refusal removes the archive the event names (unless it is not there): no
    /// other event will ever name it, so it would stay in the incoming store for good.
    #[tracing::instrument(skip_all, fields(app = %event.app, version = %event.version))]
    async fn take_ci_release(&self, event: &ReleasePublished) -> Outcome {
        let app = match published_app(event) {
            Ok(app) => app,
            Err((app, reason)) => {
                return self
                    .reject_ci(event, app.as_ref(), reason, Some(&event.object))
                    .await;
            }
        };
        match self.validate_ci_release(event, &app).await {
            Ok(detected) => match self.announce(&detected).await {
                Ok(()) => Outcome::Done,
                Err(e) => Outcome::Retry(e.to_string()),
            },
            Err(e) => match e.refusal() {
                Some(Refusal {
                    reason,
                    remove_archive,
                }) => {
                    let object = remove_archive.then_some(event.object.as_str());
                    self.reject_ci(event, Some(&app), reason, object).await
                }
                None => Outcome::Retry(e.to_string()),
            },
        }
    }

    /// Fetches the archive of `event` (whose name [`published_app`] checked) and validates it:
    /// the `package.detected` it makes.
    async fn validate_ci_release(
        &self,
        event: &ReleasePublished,
        app: &AppName,
    ) -> Result<PackageDetected, CiError> {
        let fetched = self
            .bus
            .incoming
            .fetch_archive(
                &event.object,
                &event.blake3,
                Some(event.size),
                self.settings.limits.max_archive_bytes(),
                &self.settings.work_dir(),
            )
            .await?;
        let limits = self.settings.limits.clone();
        let path = fetched.file.path().to_path_buf();
        tokio::task::spawn_blocking(move || Package::open(&path, &limits).map(|_| ()))
            .await
            .map_err(CiError::Validation)??;
        Ok(PackageDetected {
            app: app.clone(),
            version: event.version.clone(),
            object: event.object.clone(),
            size: fetched.size,
            blake3: fetched.blake3,
            source: PackageSource::Ci {
                published_by: event.published_by.clone(),
            },
        })
    }

    /// Refuses a published event that does not decode (`event_rejected`), after removing the
    /// archive it names, when it names one: the CLI uploads before it publishes, so a refused
    /// event would otherwise leave its archive in the incoming store, which nothing else would
    /// ever clean (past `nats.quotas.incoming_max_age`).
    async fn reject_undecodable(
        &self,
        msg: &async_nats::jetstream::Message,
        decode_error: DecodeError,
    ) -> Outcome {
        let mut message = decode_error.to_string();
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
        // The app and version are the span's (the CI release's or the dropped file's).
        tracing::info!(object = %detected.object, "package detected");
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
        tracing::warn!(code = %reason.code, reason = %reason.message, "package rejected");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn published(app: &str, object: Option<&str>) -> ReleasePublished {
        let version = Version::new(1, 2, 3);
        let blake3 = "ab".repeat(32);
        let object = object.map_or_else(
            || names::archive_object(app, &version, &blake3),
            str::to_string,
        );
        ReleasePublished {
            app: app.into(),
            version,
            object,
            size: 10,
            blake3,
            published_by: None,
        }
    }

    #[test]
    fn a_release_is_taken_only_under_an_app_name_and_the_archive_name_uploads_have() {
        let good = published("web", None);
        assert_eq!(published_app(&good).expect("valid").as_str(), "web");

        let (app, reason) = published_app(&published("Web App", None)).expect_err("bad name");
        assert_eq!((app, reason.code), (None, RejectCode::InvalidName));

        let (app, reason) =
            published_app(&published("web", Some("web-1.2.3.zip"))).expect_err("renamed");
        assert_eq!(app.as_ref().map(AppName::as_str), Some("web"));
        assert_eq!(reason.code, RejectCode::InvalidEvent);
        assert!(
            reason.message.contains("after the archive's BLAKE3"),
            "{}",
            reason.message
        );
    }

    /// The nak-or-reject of a CI release: what the archive is (missing, different, too large,
    /// invalid) is refused, and its archive removed unless it is not there; a store that does
    /// not answer is tried again.
    #[tokio::test]
    async fn a_bad_archive_is_refused_and_a_store_that_fails_is_retried() {
        let refusal = |e: CiError| e.refusal().map(|r| (r.reason.code, r.remove_archive));
        let object = || "web-1.2.3-ab.zip".to_string();
        assert_eq!(
            refusal(FetchError::NotFound(object()).into()),
            Some((RejectCode::ArchiveMismatch, false))
        );
        let mismatch = FetchError::Mismatch {
            object: object(),
            got: "a".into(),
            want: "b".into(),
        };
        assert_eq!(
            refusal(mismatch.into()),
            Some((RejectCode::ArchiveMismatch, true))
        );
        let too_large = FetchError::TooLarge {
            object: object(),
            size: 2,
            limit: 1,
        };
        assert_eq!(
            refusal(too_large.into()),
            Some((RejectCode::TooLarge, true))
        );
        assert_eq!(
            refusal(ArchiveError::PathTraversal("../x".into()).into()),
            Some((RejectCode::PathTraversal, true))
        );

        let unreachable = FetchError::Transient {
            object: object(),
            reason: "timed out".into(),
        };
        assert_eq!(refusal(unreachable.into()), None);
        let lost = tokio::spawn(std::future::pending::<()>());
        lost.abort();
        let lost = lost.await.expect_err("aborted");
        assert_eq!(refusal(CiError::Validation(lost)), None);
    }
}
