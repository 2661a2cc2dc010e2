//! The signer: the only process that holds the release-signing key. For each detected package
//! it reads the archive itself (trusting nothing the watcher said but the object's name), hashes
//! every file, applies policy (known app, version strictly newer than the last one signed) and
//! signs the file manifest → `release.signed`, or `release.rejected` with the reason.

mod metrics;
mod policy;
mod settings;

use std::sync::Arc;

use async_nats::jetstream::{Message, kv, stream};
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
use fleetcast_runtime::observe::{self, Endpoint, ObserveError};
use fleetcast_runtime::{Bus, BusError, Incoming, Records, Trust, TrustBucket, trust};
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
    match settings.signs() {
        settings::Signs::Any => {
            tracing::info!("signing releases of any app (known_apps = [\"*\"])")
        }
        settings::Signs::AnyInsecureDev => tracing::warn!(
            "signing releases of ANY app: known_apps is empty and nats.insecure_dev is on \
             (local development only; in production list the apps in known_apps)"
        ),
        settings::Signs::Nothing => tracing::warn!(
            "known_apps is empty: signing NO app (every release is rejected with unknown_app); \
             list the apps this signer may sign, or \"*\" for any"
        ),
        settings::Signs::Only(apps) => {
            tracing::info!(apps = %apps.join(","), "signing releases of these apps only")
        }
    }
    // Only with a root: checks that what is signed will be accepted under the current root.
    let trust = settings
        .trusted_root_file
        .as_deref()
        .map(|root| Trust::load(&[], &[], Some(root), None))
        .transpose()?
        .map(Arc::new);
    let metrics = Arc::new(metrics::Metrics::new());
    let endpoint = Endpoint::new(metrics::IDENTITY, metrics.clone());
    let Some((bus, _serving)) = observe::serve_and_connect::<SignerError, SignerBus>(
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
    let spec = ConsumerSpec {
        durable: names::SIGNER_CONSUMER,
        filter_subject: PACKAGE_DETECTED,
        ack_wait: signer.settings.ack_wait,
    };
    let rollbacks = ConsumerSpec {
        durable: names::SIGNER_ROLLBACK_CONSUMER,
        filter_subject: names::ROLLBACK_REQUESTED,
        ack_wait: signer.settings.ack_wait,
    };
    let (releases, directives) = tokio::join!(
        run_consumer(&bus.releases_stream, spec, shutdown.clone(), |msg| {
            let signer = signer.clone();
            async move { signer.handle(&msg).await }
        }),
        run_consumer(&bus.releases_stream, rollbacks, shutdown, |msg| {
            let signer = signer.clone();
            async move { signer.handle_rollback(&msg).await }
        }),
    );
    let _ = timestamps.await;
    if let Some(following) = following {
        let _ = following.await;
    }
    releases?;
    directives?;
    Ok(())
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
}

impl StepError {
    fn store(key: &str, reason: impl std::fmt::Display) -> StepError {
        StepError::Store {
            key: key.to_string(),
            reason: reason.to_string(),
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
    bus: Bus,
    releases_stream: stream::Stream,
    records: Records,
    incoming: Incoming,
    signer_state: kv::Store,
    trust: TrustBucket,
}

fleetcast_runtime::bus_role!(SignerBus);

impl Role for SignerBus {
    async fn bind(bus: &Bus) -> Result<Self, BusError> {
        Ok(SignerBus {
            releases_stream: bus.stream(names::RELEASES_STREAM).await?,
            records: bus.records().await?,
            incoming: bus.incoming().await?,
            signer_state: bus.bucket(names::SIGNER_BUCKET).await?,
            trust: TrustBucket::bind(bus).await?,
            bus: bus.clone(),
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
    /// with `rollback_from = from` and a short expiry.
    async fn handle_rollback(&self, msg: &Message) -> Outcome {
        let request: RollbackRequested = match decode_or_reject(&self.bus, SERVICE, msg).await {
            Ok(e) => e,
            Err(outcome) => {
                if matches!(outcome, Outcome::Done) {
                    self.metrics.rollbacks_refused.inc();
                }
                return outcome;
            }
        };
        let refuse_with = |code: RejectCode, message: String| async move {
            tracing::warn!(%message, "rollback refused");
            let outcome = reject_event(
                &self.bus,
                SERVICE,
                msg.subject.as_str(),
                Rejection { code, message },
            )
            .await;
            if matches!(outcome, Outcome::Done) {
                self.metrics.rollbacks_refused.inc();
            }
            outcome
        };
        let refuse = |message: String| refuse_with(RejectCode::InvalidEvent, message);
        if request.to >= request.from {
            return refuse(format!(
                "a rollback goes to an earlier version: {} is not before {}",
                request.to, request.from
            ))
            .await;
        }
        // `from` bounds what the directive withdraws and becomes every agent's highest
        // accepted version: only the latest version this signer signed (its own record, not
        // the request's word), so a typo such as 99.0.0 cannot block every release below it.
        let latest = match self.last_signed(&request.app).await {
            Ok((last, _)) => last.map(|l| l.version),
            Err(e) => return Outcome::Retry(e.to_string()),
        };
        if latest.as_ref() != Some(&request.from) {
            let latest = latest.map_or_else(|| "none".to_string(), |v| v.to_string());
            return refuse_with(
                RejectCode::RollbackFromNotLatest,
                format!(
                    "a rollback of {} replaces versions up to {}, but the latest version signed is {latest}",
                    request.app, request.from
                ),
            )
            .await;
        }
        let record = match self
            .bus
            .records
            .release_record(&request.app, &request.to)
            .await
        {
            Ok(r) => r,
            Err(e) => return Outcome::Retry(e.to_string()),
        };
        let Some(stored) = record
            .filter(|r| r.state == ReleaseState::Stored)
            .and_then(|r| r.manifest)
        else {
            return refuse(format!(
                "{} {} is not a stored release",
                request.app, request.to
            ))
            .await;
        };
        // Only what this signer signed is re-signed.
        let ours =
            fleetcast_events::TrustedKeys::new(self.keys.iter().map(SecretKey::public).collect());
        let now = now_seconds();
        let verified = match stored.verify(&ours, now) {
            Ok(v) => v,
            Err(e) => {
                return refuse(format!("stored manifest of {}: {e}", request.to)).await;
            }
        };
        let mut manifest: Manifest = (*verified).clone();
        manifest.rollback_from = Some(request.from.clone());
        manifest.created = now;
        manifest.expires = now + self.settings.rollback_ttl;
        let signed = match self.sign_manifest(&manifest) {
            Ok(s) => s,
            Err(e) => return Outcome::Retry(e.to_string()),
        };
        let directive = RollbackSigned {
            app: request.app.clone(),
            to: request.to.clone(),
            from: request.from.clone(),
            ring: request.ring.clone(),
            manifest: signed,
        };
        let msg_id = format!(
            "rollback-signed.{}.{}.{}.{}",
            request.app,
            request.to,
            request.from,
            request.ring.as_deref().unwrap_or("all")
        );
        match self
            .bus
            .publish_event(
                names::ROLLBACK_SIGNED,
                &directive,
                Encoding::Json,
                Some(&msg_id),
            )
            .await
        {
            Ok(()) => {
                tracing::info!(app = %request.app, to = %request.to, from = %request.from, "rollback directive signed");
                self.metrics.rollbacks_signed.inc();
                Outcome::Done
            }
            Err(e) => Outcome::Retry(e.to_string()),
        }
    }

    async fn handle(&self, msg: &Message) -> Outcome {
        let event: PackageDetected = match decode_or_reject(&self.bus, SERVICE, msg).await {
            Ok(e) => e,
            Err(outcome) => return self.invalid_event(outcome),
        };
        let (last, revision) = match self.last_signed(&event.app).await {
            Ok(found) => found,
            Err(e) => return Outcome::Retry(e.to_string()),
        };
        match policy::judge(&event, last.as_ref(), &self.settings.signs()) {
            // Redelivery after signing: announce again (deduplicated by message id).
            Verdict::AnnounceAgain(signed) => return self.announce(signed).await,
            Verdict::Refuse(reason) => return self.reject(&event, reason).await,
            Verdict::Sign => {}
        }
        let tree = match self.tree_of(&event).await {
            Ok(tree) => tree,
            Err(outcome) => return outcome,
        };
        let now = now_seconds();
        let manifest = Manifest {
            rollback_from: None,
            app: event.app.clone(),
            version: event.version.clone(),
            tree,
            created: now,
            expires: now + self.settings.manifest_ttl,
        };
        let signed = match self.sign_manifest(&manifest) {
            Ok(manifest) => ReleaseSigned {
                app: event.app.clone(),
                version: event.version.clone(),
                object: event.object.clone(),
                blake3: event.blake3.clone(),
                manifest,
            },
            Err(e) => return Outcome::Retry(e.to_string()),
        };
        if let Err(e) = self.remember(&signed, revision).await {
            return Outcome::Retry(e.to_string());
        }
        tracing::info!(app = %signed.app, version = %signed.version, files = manifest.tree.files, "release signed");
        // Counted here, once: a redelivery finds it in the signer's state and only announces.
        self.metrics.signed.inc();
        self.announce(&signed).await
    }

    /// Reads the event's archive itself (trusting nothing the watcher said but its name,
    /// hash and size) and builds its tree. `Err`: the outcome instead (a refusal of the
    /// archive, or a retry).
    async fn tree_of(&self, event: &PackageDetected) -> Result<TreeRoot, Outcome> {
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
                Some(reason) => return Err(self.reject(event, reason).await),
                None => return Err(Outcome::Retry(e.to_string())),
            },
        };
        let limits = self.settings.limits.clone();
        let path = fetched.file.path().to_path_buf();
        let (app, version) = (event.app.clone(), event.version.clone());
        // The tree is built here but not stored: the distributor builds it again from the
        // archive and stores it only if its root is the one signed.
        let built = tokio::task::spawn_blocking(move || {
            let mut package = Package::open(&path, &limits)?;
            // Installs on Linux, not on a case-insensitive filesystem (refused when
            // `limits.refuse_case_clashes`).
            for (a, b) in &package.warnings().case_clashes {
                tracing::warn!(%app, %version, a, b, "names that differ only in case");
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
        match built {
            Ok(Ok(tree)) => Ok(tree),
            Ok(Err(e)) => Err(self.reject(event, e.rejection()).await),
            Err(e) => Err(Outcome::Retry(format!("hashing task failed: {e}"))),
        }
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
        let state = &self.bus.signer_state;
        let stored = match revision {
            None => (state.create(&signed.app, bytes.into()).await).map_err(|e| e.to_string()),
            Some(rev) => {
                (state.update(&signed.app, bytes.into(), rev).await).map_err(|e| e.to_string())
            }
        };
        if let Err(reason) = stored {
            return Err(StepError::Raced {
                app: signed.app.clone(),
                reason,
            });
        }
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
