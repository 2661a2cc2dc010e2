//! The signer: the only process that holds the release-signing key. For each detected package
//! it reads the archive itself (trusting nothing the watcher said but the object's name), hashes
//! every file, applies policy (known app, version strictly newer than the last one signed) and
//! signs the file manifest → `release.signed`, or `release.rejected` with the reason.

mod metrics;
mod policy;
mod settings;

use std::sync::Arc;

use async_nats::jetstream::kv::{CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::{Message, kv};
use fleetcast_events::TrustedKeys;
use fleetcast_events::manifest::TreeRoot;
use fleetcast_events::names::{self, PACKAGE_DETECTED, RELEASE_SIGNED};
use fleetcast_events::tree;
use fleetcast_events::v1::*;
use fleetcast_events::{
    AppName, Encoding, Manifest, SecretKey, SignedManifest, SignedMetadata, Timestamp,
};
use fleetcast_package::{ArchiveError, Package};
use fleetcast_runtime::bus::Role;
use fleetcast_runtime::consume::{
    ConsumerSpec, Outcome, RefusedRelease, Refuser, decode_or_reject, reject_event, reject_release,
    run_consumer,
};
use fleetcast_runtime::observe::ObserveError;
use fleetcast_runtime::releases::{FetchError, PipelineBus};
use fleetcast_runtime::{Bus, BusError, Trust, TrustBucket, trust};
use futures::StreamExt;
use policy::{LastSigned, Verdict};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

pub use settings::{ANY_APP, Settings, Signs};

pub const SERVICE: &str = "signer";

#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error(transparent)]
    Settings(#[from] fleetcast_runtime::SettingsError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Observe(#[from] ObserveError),
    #[error("cannot load signing key {path}: {reason}")]
    Key { path: String, reason: String },
}

pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), SignerError> {
    settings.validate()?;
    let keys = std::iter::once(&settings.key_file)
        .chain(&settings.extra_key_files)
        .map(|path| load_key(path))
        .collect::<Result<Vec<_>, _>>()?;
    for key in &keys {
        tracing::info!(key_id = %key.public().id(), "signing key loaded");
    }
    log_what_it_signs(&settings.signs());
    // Only with a root: checks that what is signed will be accepted under the current root.
    let trust = settings
        .trusted_root_file
        .as_deref()
        .map(|root| Trust::load(&[], &[], Some(root), None))
        .transpose()?
        .map(Arc::new);
    let (metrics, endpoint) = metrics::Metrics::registered();
    let starting = endpoint.start::<SignerError, SignerBus>(SERVICE, &settings, &shutdown);
    let Some((bus, _serving)) = starting.await? else {
        return Ok(());
    };
    let signer = Signer {
        bus: bus.clone(),
        settings: Arc::new(settings),
        keys: Arc::new(keys),
        trust: trust.clone(),
        metrics,
    };
    let following = match trust {
        Some(trust) => {
            let following = trust.start_following(bus.trust.clone()).await;
            Some(tokio::spawn(
                following.run(trust::SERVICE_RECHECK, shutdown.clone()),
            ))
        }
        None => None,
    };
    let timestamps = tokio::spawn(signer.clone().publish_timestamps(shutdown.clone()));
    let (releases, directives) = signer.consume(&bus, shutdown).await;
    let _ = timestamps.await;
    if let Some(following) = following {
        let _ = following.await;
    }
    releases?;
    directives?;
    Ok(())
}

/// Says at start-up which apps this signer signs: a list that signs nothing, or anything, is
/// a warning.
fn log_what_it_signs(signs: &Signs) {
    match signs {
        Signs::Any => tracing::info!("signing releases of any app (known_apps = [\"*\"])"),
        Signs::AnyInsecureDev => tracing::warn!(
            "signing releases of ANY app: known_apps is empty and nats.insecure_dev is on \
             (local development only; in production list the apps in known_apps)"
        ),
        Signs::Nothing => tracing::warn!(
            "known_apps is empty: signing NO app (every release is rejected with unknown_app); \
             list the apps this signer may sign, or \"*\" for any"
        ),
        Signs::Only(apps) => {
            tracing::info!(apps = %apps.join(","), "signing releases of these apps only")
        }
    }
}

fn load_key(file: &std::path::Path) -> Result<SecretKey, SignerError> {
    let path = file.display().to_string();
    let fail = |reason: String| SignerError::Key {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(file).map_err(|e| fail(e.to_string()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Refused, not warned about: a key others can read may already be theirs.
        let meta = std::fs::metadata(file).map_err(|e| fail(e.to_string()))?;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(fail(format!(
                "mode {:04o}: readable or writable by group or others; chmod 600 it (and consider \
                 the key exposed)",
                mode & 0o7777
            )));
        }
    }
    SecretKey::from_text(&text).map_err(|e| fail(e.to_string()))
}

/// Now, to the second: signed times carry no sub-second noise.
fn now_seconds() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// Why a step of signing could not be done now. Each is retried: the message is delivered
/// again (a refusal of the release itself is a `Verdict`, not one of these).
#[derive(Debug, thiserror::Error)]
enum StepError {
    /// The signer's bucket could not be read or written (NATS unavailable, a timeout).
    #[error("signer state {key}: {reason}")]
    Store { key: String, reason: String },
    /// Another signer wrote the app's state between our read and our write.
    #[error("signer state for {app} changed meanwhile: {reason}")]
    Raced { app: AppName, reason: String },
    /// The app's state does not decode (written by something else than a signer).
    #[error("signer state for {app}: unreadable: {reason}")]
    Corrupt { app: AppName, reason: String },
    #[error(transparent)]
    Records(#[from] fleetcast_runtime::releases::RecordError),
    /// What the keys sign would be refused by every host under the current root.
    #[error(
        "the signer's keys are not accepted under root version {root}: {reason}; waiting for \
         the keys or the root to be fixed"
    )]
    KeysNotTrusted { root: u64, reason: String },
    #[error("cannot serialise {what}: {reason}")]
    Encode { what: &'static str, reason: String },
    #[error("cannot publish the timestamp: {0}")]
    Publish(String),
    #[error(transparent)]
    Announce(#[from] BusError),
}

/// Why a detected package was not signed: refused for what it is, or a failure that may
/// pass (see [`SignError::rejection`]).
#[derive(Debug, thiserror::Error)]
enum SignError {
    /// The policy refuses it (an app this signer does not sign, a version not newer).
    #[error("{0}")]
    Refused(Rejection),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("hashing task failed: {0}")]
    Hashing(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Step(#[from] StepError),
}

impl SignError {
    /// The refusal of the package this is, or `None` if it may pass and the event is
    /// delivered again: the archive missing, different, too large or invalid, or the policy's
    /// refusal, are what the package is; the store, a task or the keys failing are not.
    fn rejection(&self) -> Option<Rejection> {
        match self {
            SignError::Refused(reason) => Some(reason.clone()),
            SignError::Fetch(e) => e.rejection(),
            SignError::Archive(e) => Some(e.rejection()),
            SignError::Hashing(_) | SignError::Step(_) => None,
        }
    }
}

impl StepError {
    fn store(key: &str, reason: impl std::fmt::Display) -> StepError {
        StepError::Store {
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }

    /// A failed write of `app`'s state: `raced` when another signer wrote it in between (the
    /// revision it was read at is no longer the last), the bucket failing otherwise.
    fn write(app: &AppName, raced: bool, reason: impl std::fmt::Display) -> StepError {
        if raced {
            StepError::Raced {
                app: app.clone(),
                reason: reason.to_string(),
            }
        } else {
            StepError::store(app, reason)
        }
    }

    fn encode(what: &'static str, reason: impl std::fmt::Display) -> StepError {
        StepError::Encode {
            what,
            reason: reason.to_string(),
        }
    }
}

/// What the signer uses of the bus: the release events (detected packages and rollback
/// requests in, signatures and refusals out), the release records, the incoming archives, its
/// own state (each app's last version), and the trust bucket (roots read, timestamps written).
#[derive(Clone)]
struct SignerBus {
    /// The release events, records and incoming archives (as every pipeline service).
    bus: PipelineBus,
    signer_state: kv::Store,
    trust: TrustBucket,
}

fleetcast_runtime::bus_role!(SignerBus => PipelineBus);

impl Role for SignerBus {
    async fn bind(bus: &Bus) -> Result<Self, BusError> {
        Ok(SignerBus {
            bus: PipelineBus::bind(bus).await?,
            signer_state: bus.bucket(names::SIGNER_BUCKET).await?,
            trust: TrustBucket::bind(bus).await?,
        })
    }
}

#[derive(Clone)]
struct Signer {
    bus: SignerBus,
    settings: Arc<Settings>,
    keys: Arc<Vec<SecretKey>>,
    trust: Option<Arc<Trust>>,
    metrics: Arc<metrics::Metrics>,
}

impl Signer {
    /// Signs detected packages and rollback requests until `shutdown`: how each consumer ended.
    async fn consume(
        &self,
        bus: &SignerBus,
        shutdown: CancellationToken,
    ) -> (Result<(), BusError>, Result<(), BusError>) {
        let releases = ConsumerSpec {
            durable: names::SIGNER_CONSUMER,
            filter_subject: PACKAGE_DETECTED,
            ack_wait: self.settings.ack_wait,
        };
        let rollbacks = ConsumerSpec {
            durable: names::SIGNER_ROLLBACK_CONSUMER,
            filter_subject: names::ROLLBACK_REQUESTED,
            ack_wait: self.settings.ack_wait,
        };
        tokio::join!(
            run_consumer(&bus.releases_stream, releases, shutdown.clone(), |msg| {
                async move { self.handle(&msg).await }
            }),
            run_consumer(&bus.releases_stream, rollbacks, shutdown, |msg| {
                async move { self.handle_rollback(&msg).await }
            }),
        )
    }

    fn key_refs(&self) -> Vec<&SecretKey> {
        self.keys.iter().collect()
    }

    /// Signs `manifest` with every key, and checks the result is what the current root
    /// accepts: a release signed with keys the root revoked (or too few for its threshold)
    /// would be announced only to be refused by every host.
    fn sign_manifest(&self, manifest: &Manifest) -> Result<SignedManifest, StepError> {
        let signed = SignedManifest::sign(manifest, &self.key_refs())
            .map_err(|e| StepError::encode("the manifest", e))?;
        if let Some(trust) = &self.trust {
            let now = OffsetDateTime::now_utc();
            trust
                .keys(now)
                .and_then(|keys| signed.verify(&keys, now))
                .map_err(|e| {
                    let error = StepError::KeysNotTrusted {
                        root: trust.root_version(),
                        reason: e.to_string(),
                    };
                    tracing::error!(%error);
                    error
                })?;
        }
        Ok(signed)
    }

    /// Publishes a fresh timestamp every `timestamp_interval`: the newest version signed per
    /// app, under the current root. Agents that stop receiving them report stale metadata.
    async fn publish_timestamps(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.settings.timestamp_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if let Err(e) = self.publish_timestamp().await {
                tracing::warn!(error = %e, "timestamp not published");
            }
        }
    }

    async fn publish_timestamp(&self) -> Result<(), StepError> {
        let mut releases = std::collections::BTreeMap::new();
        let listing = "(listing)";
        let mut apps =
            (self.bus.signer_state.keys().await).map_err(|e| StepError::store(listing, e))?;
        while let Some(app) = apps.next().await {
            let key = app.map_err(|e| StepError::store(listing, e))?;
            // Only a signer writes this bucket, under the names it signed.
            let Ok(app) = AppName::try_from(key.as_str()) else {
                tracing::warn!(%key, "signer state under a key that is no app name; skipped");
                continue;
            };
            if let (Some(last), _) = self.last_signed(&app).await? {
                releases.insert(key, last.version);
            }
        }
        let issued = now_seconds();
        let timestamp = Timestamp {
            issued,
            expires: issued + self.settings.timestamp_ttl,
            root_version: self.trust.as_ref().map_or(0, |t| t.root_version()),
            releases,
        };
        let signed = SignedMetadata::sign(&timestamp, &self.key_refs())
            .map_err(|e| StepError::encode("the timestamp", e))?;
        let bytes = Encoding::Json
            .encode(&signed)
            .map_err(|e| StepError::encode("the timestamp", e))?;
        self.bus
            .trust
            .store()
            .put(names::TIMESTAMP_KEY, bytes.into())
            .await
            .map_err(|e| StepError::Publish(e.to_string()))?;
        self.metrics.timestamps.inc();
        Ok(())
    }

    /// A rollback request: `from` must be the latest version this signer signed for the app,
    /// `to` a release this signer signed and the distributor stored; its manifest is re-signed
    /// with `rollback_from = from` and a short expiry (`policy::judge_rollback`).
    async fn handle_rollback(&self, msg: &Message) -> Outcome {
        match decode_or_reject(&self.bus, SERVICE, msg).await {
            Ok(request) => self.sign_rollback(&request, &msg.subject).await,
            Err(outcome) => self.rollback_refused(outcome),
        }
    }

    /// Reads what the policy needs, asks it, and signs the directive or refuses the request
    /// (received on `subject`).
    #[tracing::instrument(skip_all, fields(app = %request.app, to = %request.to, from = %request.from))]
    async fn sign_rollback(&self, request: &RollbackRequested, subject: &str) -> Outcome {
        let (latest, target) = match self.rollback_facts(request).await {
            Ok(facts) => facts,
            Err(e) => return Outcome::Retry(e.to_string()),
        };
        let ours = TrustedKeys::new(self.keys.iter().map(SecretKey::public).collect());
        let now = now_seconds();
        let ttl = self.settings.rollback_ttl;
        match policy::judge_rollback(request, latest.as_ref(), target, &ours, now, ttl) {
            Ok(manifest) => match self.publish_rollback(request, &manifest).await {
                Ok(()) => {
                    tracing::info!("rollback directive signed");
                    self.metrics.rollbacks_signed.inc();
                    Outcome::Done
                }
                Err(e) => Outcome::Retry(e.to_string()),
            },
            Err(reason) => {
                tracing::warn!(message = %reason.message, "rollback refused");
                let outcome = reject_event(&self.bus, SERVICE, subject, reason).await;
                self.rollback_refused(outcome)
            }
        }
    }

    /// What the rollback policy judges by: the latest version this signer signed for the
    /// app, and the release record of the version rolled back to.
    async fn rollback_facts(
        &self,
        request: &RollbackRequested,
    ) -> Result<(Option<semver::Version>, Option<ReleaseRecord>), StepError> {
        let (last, _) = self.last_signed(&request.app).await?;
        let target = self
            .bus
            .records
            .release_record(&request.app, &request.to)
            .await?;
        Ok((last.map(|l| l.version), target))
    }

    /// Signs the rollback `manifest` and publishes the directive (deduplicated by a message
    /// id naming the request).
    async fn publish_rollback(
        &self,
        request: &RollbackRequested,
        manifest: &Manifest,
    ) -> Result<(), StepError> {
        let directive = RollbackSigned {
            app: request.app.clone(),
            to: request.to.clone(),
            from: request.from.clone(),
            ring: request.ring.clone(),
            manifest: self.sign_manifest(manifest)?,
        };
        let msg_id = format!(
            "rollback-signed.{}.{}.{}.{}",
            request.app,
            request.to,
            request.from,
            request.ring.as_deref().unwrap_or("all")
        );
        self.bus
            .publish_event(
                names::ROLLBACK_SIGNED,
                &directive,
                Encoding::Json,
                Some(&msg_id),
            )
            .await?;
        Ok(())
    }

    /// Counts a rollback request refused once the refusal is published.
    fn rollback_refused(&self, outcome: Outcome) -> Outcome {
        if matches!(outcome, Outcome::Done) {
            self.metrics.rollbacks_refused.inc();
        }
        outcome
    }

    async fn handle(&self, msg: &Message) -> Outcome {
        match decode_or_reject(&self.bus, SERVICE, msg).await {
            Ok(event) => self.sign_release(&event).await,
            Err(outcome) => self.invalid_event(outcome),
        }
    }

    /// Signs the detected package `event` and announces it (again, for a redelivery after
    /// signing), or refuses it.
    #[tracing::instrument(skip_all, fields(app = %event.app, version = %event.version))]
    async fn sign_release(&self, event: &PackageDetected) -> Outcome {
        match self.signed(event).await {
            Ok(signed) => self.announce(&signed).await,
            Err(e) => match e.rejection() {
                Some(reason) => self.reject(event, reason).await,
                None => Outcome::Retry(e.to_string()),
            },
        }
    }

    /// The release `event` is signed as: signed now and remembered, or, for a redelivery
    /// after signing, as it was signed then.
    async fn signed(&self, event: &PackageDetected) -> Result<ReleaseSigned, SignError> {
        let (last, revision) = self.last_signed(&event.app).await?;
        match policy::judge(event, last.as_ref(), &self.settings.signs()) {
            // Redelivery after signing: announce again (deduplicated by message id).
            Verdict::AnnounceAgain(signed) => return Ok(signed.clone()),
            Verdict::Refuse(reason) => return Err(SignError::Refused(reason)),
            Verdict::Sign => {}
        }
        let now = now_seconds();
        let manifest = Manifest {
            rollback_from: None,
            app: event.app.clone(),
            version: event.version.clone(),
            tree: self.tree_of(event).await?,
            created: now,
            expires: now + self.settings.manifest_ttl,
        };
        let signed = ReleaseSigned {
            app: event.app.clone(),
            version: event.version.clone(),
            object: event.object.clone(),
            blake3: event.blake3.clone(),
            manifest: self.sign_manifest(&manifest)?,
        };
        self.remember(&signed, revision).await?;
        tracing::info!(files = manifest.tree.files, "release signed");
        // Counted here, once: a redelivery finds it in the signer's state and only announces.
        self.metrics.signed.inc();
        Ok(signed)
    }

    /// Reads the event's archive itself (trusting nothing the watcher said but its name,
    /// hash and size) and builds its tree.
    async fn tree_of(&self, event: &PackageDetected) -> Result<TreeRoot, SignError> {
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
        // The blocking thread logs in this handler's span (app, version).
        let span = tracing::Span::current();
        // The tree is built here but not stored: the distributor builds it again from the
        // archive and stores it only if its root is the one signed.
        let built = tokio::task::spawn_blocking(move || {
            let _handler = span.enter();
            let mut package = Package::open(&path, &limits)?;
            // Installs on Linux, not on a case-insensitive filesystem (refused when
            // `limits.refuse_case_clashes`).
            for (a, b) in &package.warnings().case_clashes {
                tracing::warn!(a, b, "names that differ only in case");
            }
            let files = package.file_tree()?;
            // The archive's parsed central directory is not needed for the tree.
            drop(package);
            let built = tree::build(&files).map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
            Ok::<_, ArchiveError>(TreeRoot::of(&built, &files))
        })
        .await;
        // The archive's files and tree are freed: give the memory back before the next one.
        fleetcast_runtime::memory::release_freed_soon();
        Ok(built??)
    }

    /// Records `signed` as the app's last signed release (compare-and-set on `revision`, so
    /// two signers racing on the same app cannot both sign) and writes its release record.
    async fn remember(
        &self,
        signed: &ReleaseSigned,
        revision: Option<u64>,
    ) -> Result<(), StepError> {
        let record = LastSigned {
            version: signed.version.clone(),
            signed: signed.clone(),
        };
        let bytes = Encoding::Json
            .encode(&record)
            .map_err(|e| StepError::encode("the signer state", e))?;
        let (state, app) = (&self.bus.signer_state, &signed.app);
        let written = match revision {
            None => (state.create(app, bytes.into()).await)
                .map_err(|e| StepError::write(app, e.kind() == CreateErrorKind::AlreadyExists, e)),
            Some(rev) => (state.update(app, bytes.into(), rev).await).map_err(|e| {
                StepError::write(app, e.kind() == UpdateErrorKind::WrongLastRevision, e)
            }),
        };
        written?;
        let release = ReleaseRecord {
            app: signed.app.clone(),
            version: signed.version.clone(),
            state: ReleaseState::Signed,
            blake3: Some(signed.blake3.clone()),
            reason: None,
            manifest: Some(signed.manifest.clone()),
            stored: None,
            updated: OffsetDateTime::now_utc(),
        };
        Ok(self.bus.records.put_release_record(&release).await?)
    }

    async fn last_signed(
        &self,
        app: &AppName,
    ) -> Result<(Option<LastSigned>, Option<u64>), StepError> {
        let entry = self.bus.signer_state.entry(app.as_str()).await;
        match entry.map_err(|e| StepError::store(app, e))? {
            Some(entry) if matches!(entry.operation, async_nats::jetstream::kv::Operation::Put) => {
                let last = Encoding::Json
                    .decode(&entry.value)
                    .map_err(|e| StepError::Corrupt {
                        app: app.clone(),
                        reason: e.to_string(),
                    })?;
                Ok((Some(last), Some(entry.revision)))
            }
            Some(entry) => Ok((None, Some(entry.revision))),
            None => Ok((None, None)),
        }
    }

    async fn announce(&self, signed: &ReleaseSigned) -> Outcome {
        let msg_id = format!("signed.{}", signed.object);
        match self
            .bus
            .publish_event(RELEASE_SIGNED, signed, Encoding::MsgPack, Some(&msg_id))
            .await
        {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::Retry(e.to_string()),
        }
    }

    /// Counts a detected package refused as an invalid event once the refusal is published.
    fn invalid_event(&self, outcome: Outcome) -> Outcome {
        if matches!(outcome, Outcome::Done) {
            self.metrics.rejected(RejectCode::InvalidEvent);
        }
        outcome
    }

    fn refuser(&self) -> Refuser<'_> {
        Refuser {
            stage: SERVICE,
            bus: &self.bus,
            records: &self.bus.records,
            incoming: &self.bus.incoming,
        }
    }

    async fn reject(&self, event: &PackageDetected, reason: Rejection) -> Outcome {
        let code = reason.code;
        let release = RefusedRelease {
            app: &event.app,
            version: &event.version,
            blake3: &event.blake3,
            archive: Some(&event.object),
        };
        let outcome = reject_release(self.refuser(), release, reason, false).await;
        if matches!(outcome, Outcome::Done) {
            self.metrics.rejected(code);
        }
        outcome
    }
}

/// The `fleetcast-signer` program: its settings from its config file and environment, run until
/// a signal. (Also what the `fleetcast` binary runs when called by this name: the container
/// image's multi-call binary.)
pub fn main() -> std::process::ExitCode {
    // A large release's lists are returned to the OS when it is signed (`map_large_blocks`).
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

    /// The nak-or-reject of a detected package: what the package is (refused by the policy,
    /// its archive missing, different, too large or invalid, no room to read it) is refused;
    /// the store or the signer's state failing is tried again.
    #[test]
    fn what_the_package_is_is_refused_and_a_failure_that_may_pass_is_retried() {
        let code = |e: SignError| e.rejection().map(|r| r.code);
        let not_newer = Rejection {
            code: RejectCode::VersionNotNewer,
            message: "1.0.0 is not newer".into(),
        };
        assert_eq!(
            SignError::Refused(not_newer.clone()).rejection(),
            Some(not_newer)
        );
        let object = || "web-1.0.0-ab.zip".to_string();
        assert_eq!(
            code(FetchError::NotFound(object()).into()),
            Some(RejectCode::ArchiveMismatch)
        );
        let disk_full = FetchError::DiskFull {
            object: object(),
            dir: "/var/tmp".into(),
            reason: "no space left on device".into(),
        };
        assert_eq!(code(disk_full.into()), Some(RejectCode::DiskFull));
        assert_eq!(
            code(ArchiveError::AbsolutePath("/etc/x".into()).into()),
            Some(RejectCode::AbsolutePath)
        );

        let unreachable = FetchError::Transient {
            object: object(),
            reason: "timed out".into(),
        };
        assert_eq!(code(unreachable.into()), None);
        let web = AppName::from_static("web");
        assert_eq!(code(StepError::store(&web, "timed out").into()), None);
        assert_eq!(
            code(StepError::write(&web, true, "wrong last revision").into()),
            None
        );
        let corrupt = StepError::Corrupt {
            app: web,
            reason: "expected value".into(),
        };
        assert_eq!(code(corrupt.into()), None);
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("signing.key");
        let key = SecretKey::generate().expect("key");
        std::fs::write(&path, key.to_text()).expect("write");
        for mode in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let Err(e) = load_key(&path) else {
                panic!("mode {mode:o} refused");
            };
            assert!(e.to_string().contains("chmod 600"), "{mode:o}: {e}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(
            load_key(&path).expect("0600 loads").public().id(),
            key.public().id()
        );
    }
}
