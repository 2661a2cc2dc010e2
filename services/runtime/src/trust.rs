//! A verifier's trust (the agent's, the distributor's, the signer's own check): either keys
//! pinned in its settings, or a root it walks forward from as operators publish new ones
//! (`root.<N>` in the trust bucket), plus the freshest timestamp the signer published. With a
//! state folder (the agent's, outside its install folders) both are written on every change
//! and read back at start, so a restarted verifier neither forgets a rotation nor accepts an
//! older timestamp than it saw.
//!
//! What is read back is checked as if it came from the bus, since whoever can write the folder
//! (an app running as the agent's user, before apps ran as their own users) must not be able to
//! choose the agent's trust: each saved root (`root.<N>.json`) is taken only as the next link
//! of the chain from the configured first root, and the saved timestamp only when the root so
//! reached signed it. What does not verify is refused, logged and reported in
//! [`Trust::status`]'s notes, and the verifier goes on from the configured root, following the
//! published rotations again.
//!
//! Clocks: a timestamp issued further ahead of the verifier's clock than `max_clock_skew` is
//! refused and reported (the verifier's clock is behind, or the signer's ahead: expiries
//! cannot be judged, so the metadata reads as stale rather than as fresh forever); expiries of
//! roots and timestamps are judged with the same tolerance, so two clocks a little apart do
//! not refuse each other's fresh metadata.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetcast_events::names::{TIMESTAMP_KEY, TRUST_SUBJECT_PREFIX, root_key};
use fleetcast_events::v1::MetadataStatus;
use fleetcast_events::{SignedMetadata, Timestamp, TrustError, TrustedKeys, TrustedRoot};
use futures::StreamExt;
use semver::Version;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::settings::SettingsError;
use crate::{AgentBus, Bus};

/// How often a service (signer, distributor) reads the trust bucket again behind the
/// subscription; agents use their own `recheck`.
pub const SERVICE_RECHECK: Duration = Duration::from_secs(300);

/// The default tolerance between a verifier's clock and the signer's (see the module doc).
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Written by fleetcast 0.2 (the newest root only); read as one more candidate link.
const LEGACY_ROOT_FILE: &str = "root.json";
const TIMESTAMP_FILE: &str = "timestamp.json";
/// A walk forward stops after this many roots at once (a hostile store cannot keep a verifier
/// busy forever; the next refresh goes on from there).
const MAX_ROOTS_PER_REFRESH: u64 = 64;
/// Saved roots read at start: far more rotations than a deployment makes, and a bound on what a
/// folder filled by someone else costs.
const MAX_SAVED_ROOTS: usize = 1024;

/// Each root is saved under its version: the chain from the configured root is walked again
/// at every start.
fn root_file(version: u64) -> String {
    format!("root.{version}.json")
}

pub struct Trust {
    state: Mutex<State>,
    /// The root version, changed on every rotation (see [`Trust::root_updates`]).
    roots: tokio::sync::watch::Sender<u64>,
    dir: Option<PathBuf>,
    started: OffsetDateTime,
    max_clock_skew: time::Duration,
}

struct State {
    anchor: Anchor,
    /// The freshest timestamp taken, verified and not expired when taken.
    timestamp: Option<Timestamp>,
    /// The newest `issued` of an authentic timestamp seen (the held one, or a saved one that
    /// expired while the verifier was down): nothing older is taken.
    floor: Option<OffsetDateTime>,
    /// What was refused when the saved state was read back (reported for the process's life).
    load_notes: Vec<String>,
    /// The last authentic timestamp refused for coming from beyond the clock's tolerance: its
    /// `issued`, and this clock when it came. Cleared when a timestamp is taken.
    ahead: Option<(OffsetDateTime, OffsetDateTime)>,
    /// Per app: the newest version the timestamp lists that the host has not accepted, and
    /// since when (this clock) the host has been behind.
    behind: BTreeMap<fleetcast_events::AppName, (Version, OffsetDateTime)>,
}

enum Anchor {
    Pinned(TrustedKeys),
    Root(TrustedRoot),
}

impl Trust {
    /// From a verifier's settings: its first root (`root_file`), else its pinned keys. With
    /// `dir`, the root and timestamp reached before are read back from it, checked (see the
    /// module doc), with the default clock tolerance.
    pub fn load(
        pinned_keys: &[String],
        pinned_key_files: &[PathBuf],
        root_file: Option<&Path>,
        dir: Option<&Path>,
    ) -> Result<Trust, SettingsError> {
        Trust::load_with(
            pinned_keys,
            pinned_key_files,
            root_file,
            dir,
            DEFAULT_MAX_CLOCK_SKEW,
            OffsetDateTime::now_utc(),
        )
    }

    /// [`Trust::load`] with the verifier's clock tolerance, at `now`.
    pub fn load_with(
        pinned_keys: &[String],
        pinned_key_files: &[PathBuf],
        root_file: Option<&Path>,
        dir: Option<&Path>,
        max_clock_skew: Duration,
        now: OffsetDateTime,
    ) -> Result<Trust, SettingsError> {
        let max_clock_skew =
            time::Duration::try_from(max_clock_skew).map_err(|e| SettingsError::Value {
                key: "max_clock_skew".into(),
                reason: e.to_string(),
            })?;
        let mut load_notes = Vec::new();
        let anchor = match root_file {
            None => Anchor::Pinned(crate::settings::trusted_keys(
                pinned_keys,
                pinned_key_files,
            )?),
            Some(path) => {
                let fail = |e: MetadataError| SettingsError::Value {
                    key: "trusted_root_file".into(),
                    reason: format!("{}: {e}", path.display()),
                };
                let first = read_root(path).map_err(fail)?;
                match dir {
                    Some(dir) => Anchor::Root(walk_saved_roots(first, dir, &mut load_notes)),
                    None => Anchor::Root(first),
                }
            }
        };
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir).map_err(|e| SettingsError::Value {
                key: "data_dir".into(),
                reason: format!("{}: {e}", dir.display()),
            })?;
        }
        let version = match &anchor {
            Anchor::Pinned(_) => 0,
            Anchor::Root(root) => root.version(),
        };
        let trust = Trust {
            roots: tokio::sync::watch::Sender::new(version),
            state: Mutex::new(State {
                anchor,
                timestamp: None,
                floor: None,
                load_notes,
                ahead: None,
                behind: BTreeMap::new(),
            }),
            dir: dir.map(Path::to_path_buf),
            started: now,
            max_clock_skew,
        };
        if let Some(dir) = dir {
            trust.load_timestamp(&dir.join(TIMESTAMP_FILE), now);
        }
        Ok(trust)
    }

    /// The saved timestamp, checked like one from the bus under the root reached: taken when
    /// valid; only its `issued` kept (nothing older is taken) when it expired while the
    /// verifier was down; refused and reported when it does not verify or comes from beyond
    /// the clock's tolerance.
    fn load_timestamp(&self, path: &Path, now: OffsetDateTime) {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => return self.load_note(format!("saved timestamp {}: {e}", path.display())),
        };
        let signed = match decode(&bytes) {
            Ok(signed) => signed,
            Err(e) => {
                let e = MetadataError::from(e);
                return self.load_note(format!("saved timestamp {}: {e}", path.display()));
            }
        };
        let checked = self.keys(now).and_then(|keys| {
            keys.check(&signed.signed, &signed.signatures)?;
            signed.unverified::<Timestamp>()
        });
        let timestamp = match checked {
            Ok(t) => t,
            Err(e) => {
                return self.load_note(format!(
                    "saved timestamp {} refused: {e}; waiting for a fresh one",
                    path.display()
                ));
            }
        };
        if let Err(e) = self.not_from_the_future(&timestamp, now) {
            self.state().ahead = Some((timestamp.issued, now));
            return self.load_note(format!("saved timestamp {} refused: {e}", path.display()));
        }
        let mut state = self.state();
        state.floor = Some(timestamp.issued);
        if now - self.max_clock_skew <= timestamp.expires {
            state.timestamp = Some(timestamp);
        }
    }

    fn load_note(&self, note: String) {
        tracing::warn!(%note, "trust state refused");
        self.state().load_notes.push(note);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned one is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tolerance between this verifier's clock and the signer's.
    pub fn max_clock_skew(&self) -> Duration {
        Duration::try_from(self.max_clock_skew).unwrap_or_default()
    }

    /// The instant expiries are judged against: `now` less the clock tolerance, so metadata
    /// is refused once it expired by this verifier's clock *and* by any clock within the
    /// tolerance of it.
    pub fn expiry_clock(&self, now: OffsetDateTime) -> OffsetDateTime {
        now - self.max_clock_skew
    }

    /// The keys that must sign manifests and timestamps now (the root's expiry judged with the
    /// clock tolerance).
    pub fn keys(&self, now: OffsetDateTime) -> Result<TrustedKeys, TrustError> {
        let judged = self.expiry_clock(now);
        match &self.state().anchor {
            Anchor::Pinned(keys) => Ok(keys.clone()),
            Anchor::Root(root) => root.signing_keys(judged).cloned(),
        }
    }

    /// 0 with pinned keys.
    pub fn root_version(&self) -> u64 {
        match &self.state().anchor {
            Anchor::Pinned(_) => 0,
            Anchor::Root(root) => root.version(),
        }
    }

    /// A published root: taken when it is the next version and properly signed. Returns
    /// whether it was taken (an old or current one is not an error; pinned keys take none).
    pub fn apply_root(&self, signed: &SignedMetadata) -> Result<bool, TrustError> {
        let mut state = self.state();
        let Anchor::Root(current) = &state.anchor else {
            return Ok(false);
        };
        let next = current.next(signed)?;
        tracing::info!(version = next.version(), "new root of trust");
        let version = next.version();
        self.persist(&root_file(version), next.signed());
        state.anchor = Anchor::Root(next);
        drop(state);
        self.roots.send_replace(version);
        Ok(true)
    }

    /// Changes with every new root: what was refused under the old one may pass now (a
    /// release signed by a key the new root adds), so holders re-read what they refused.
    pub fn root_updates(&self) -> tokio::sync::watch::Receiver<u64> {
        self.roots.subscribe()
    }

    fn not_from_the_future(
        &self,
        timestamp: &Timestamp,
        now: OffsetDateTime,
    ) -> Result<(), TrustError> {
        let ahead = timestamp.issued - now;
        if ahead > self.max_clock_skew {
            return Err(TrustError::FromTheFuture {
                issued: timestamp.issued.to_string(),
                now: now.to_string(),
                ahead_s: ahead.whole_seconds(),
                tolerance_s: self.max_clock_skew.whole_seconds().unsigned_abs(),
            });
        }
        Ok(())
    }

    /// The signer's timestamp: taken when signed by the current signing keys, not expired
    /// (with the clock tolerance), not issued beyond the tolerance ahead of `now`, and newer
    /// than the one held.
    pub fn apply_timestamp(
        &self,
        signed: &SignedMetadata,
        now: OffsetDateTime,
    ) -> Result<bool, TrustError> {
        let keys = self.keys(now)?;
        let timestamp = signed.verify_timestamp(&keys, self.expiry_clock(now))?;
        let mut state = self.state();
        if let Err(e) = self.not_from_the_future(&timestamp, now) {
            // Authentic (its signature checked): the clocks disagree. Reported until a
            // timestamp is taken again.
            if state.ahead.is_none() {
                tracing::warn!(error = %e, "signed timestamp from the future refused");
            }
            state.ahead = Some((timestamp.issued, now));
            return Err(e);
        }
        let seen = state.timestamp.as_ref().map(|t| t.issued).max(state.floor);
        if let Some(seen) = seen {
            if seen == timestamp.issued && state.timestamp.is_some() {
                return Ok(false);
            }
            if seen > timestamp.issued {
                return Err(TrustError::TimestampReplayed {
                    found: timestamp.issued.to_string(),
                    seen: seen.to_string(),
                });
            }
        }
        self.persist(TIMESTAMP_FILE, signed);
        state.floor = Some(timestamp.issued);
        state.timestamp = Some(timestamp);
        state.ahead = None;
        Ok(true)
    }

    pub fn timestamp(&self) -> Option<Timestamp> {
        self.state().timestamp.clone()
    }

    /// Whether the timestamp held names a newer root than the one held (a root walk is due).
    fn newer_root_announced(&self) -> bool {
        let state = self.state();
        match (&state.anchor, &state.timestamp) {
            (Anchor::Root(root), Some(t)) => t.root_version > root.version(),
            _ => false,
        }
    }

    /// What the verifier reports about its metadata at `now`. Stale: its root expired; the
    /// freshest timestamp it holds was issued longer than `max_age` ago (or none came in
    /// `max_age` since it started); a signed timestamp came from beyond its clock's tolerance
    /// (its clock is behind: expiries cannot be judged); the timestamp names a newer root than
    /// it reached. Notes: what was refused from the saved state, and each app in `accepted`
    /// (with the newest version the host accepted for it) that stayed behind the timestamp's
    /// newest version for it longer than `max_age`.
    pub fn status(
        &self,
        now: OffsetDateTime,
        max_age: Option<Duration>,
        accepted: &[(fleetcast_events::AppName, Option<Version>)],
    ) -> MetadataStatus {
        let root_version = self.root_version();
        // Before the state is locked: `keys` locks it too.
        let mut reasons: Vec<String> = self
            .keys(now)
            .err()
            .map(|e| e.to_string())
            .into_iter()
            .collect();
        let mut state = self.state();
        let issued = state.timestamp.as_ref().map(|t| t.issued);
        reasons.extend(self.stale_reasons(&state, root_version, now, max_age));
        let mut notes = state.load_notes.clone();
        let (behind, lagging) = behind_the_signer(&state, now, max_age, accepted);
        state.behind = behind;
        drop(state);
        notes.extend(lagging);
        let mut reasons = reasons.into_iter();
        let reason = reasons.next();
        // More than one reason: the first is the reason, the rest are noted.
        notes.extend(reasons);
        MetadataStatus {
            root_version,
            timestamp: issued,
            stale: reason.is_some(),
            reason,
            notes,
        }
    }

    /// Why the metadata held cannot be trusted to be current: a timestamp from beyond the
    /// clock's tolerance, none (or only an old one) within `max_age`, a newer root the signer
    /// signs under that this verifier does not hold.
    fn stale_reasons(
        &self,
        state: &State,
        root_version: u64,
        now: OffsetDateTime,
        max_age: Option<Duration>,
    ) -> Vec<String> {
        let mut reasons = Vec::new();
        let issued = state.timestamp.as_ref().map(|t| t.issued);
        if let Some((ahead, at)) = state.ahead {
            reasons.push(format!(
                "a signed timestamp issued at {ahead} was {}s ahead of this host's clock at {at} (tolerance {}s): this host's clock is behind or the signer's ahead; expiries cannot be judged",
                (ahead - at).whole_seconds(),
                self.max_clock_skew.whole_seconds()
            ));
        }
        if let Some(max_age) = max_age {
            let since = issued.unwrap_or(self.started);
            let age = Duration::try_from(now - since).unwrap_or_default();
            if age > max_age {
                reasons.push(match issued {
                    Some(at) => format!(
                        "the newest timestamp was issued at {at}, {}s ago (limit {}s): updates may be withheld",
                        age.as_secs(),
                        max_age.as_secs()
                    ),
                    None => format!(
                        "no timestamp from the signer in {}s (limit {}s): updates may be withheld",
                        age.as_secs(),
                        max_age.as_secs()
                    ),
                });
            }
        }
        if let (Anchor::Root(_), Some(t)) = (&state.anchor, &state.timestamp)
            && t.root_version > root_version
        {
            reasons.push(format!(
                "the signer signs under root version {}, this host holds {root_version}: the newer roots are not published or were refused",
                t.root_version
            ));
        }
        reasons
    }

    fn persist(&self, file: &str, signed: &SignedMetadata) {
        let Some(dir) = &self.dir else { return };
        let path = dir.join(file);
        let written = serde_json::to_vec_pretty(signed)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::fs::write_atomic(&path, &bytes));
        if let Err(e) = written {
            // In memory it is taken; a restart re-walks from the last persisted root.
            tracing::warn!(path = %path.display(), error = %e, "trust state not persisted");
        }
    }

    /// Walks forward through every published root after the current one, then takes the
    /// stored timestamp.
    async fn refresh(&self, store: &impl TrustSource) -> Result<(), FollowError> {
        for _ in 0..MAX_ROOTS_PER_REFRESH {
            if matches!(self.state().anchor, Anchor::Pinned(_)) {
                break;
            }
            let Some(next) = self.root_version().checked_add(1) else {
                break;
            };
            let key = root_key(next);
            let unreadable = |source| FollowError::Unreadable {
                key: key.clone(),
                source,
            };
            let Some(bytes) = store.get(&key).await.map_err(unreadable)? else {
                break;
            };
            let signed = decode(&bytes).map_err(|e| FollowError::Refused {
                key: key.clone(),
                source: e.into(),
            })?;
            self.apply_root(&signed).map_err(|e| FollowError::Refused {
                key: key.clone(),
                source: e.into(),
            })?;
        }
        let Some(bytes) =
            store
                .get(TIMESTAMP_KEY)
                .await
                .map_err(|source| FollowError::Unreadable {
                    key: TIMESTAMP_KEY.into(),
                    source,
                })?
        else {
            return Ok(());
        };
        self.take_timestamp(&bytes);
        Ok(())
    }

    /// Takes a published timestamp; returns whether it names a newer root than the one held
    /// (the caller walks the roots then).
    fn take_timestamp(&self, bytes: &[u8]) -> bool {
        let taken = decode(bytes)
            .map_err(MetadataError::from)
            .and_then(|s| Ok(self.apply_timestamp(&s, OffsetDateTime::now_utc())?));
        match taken {
            Ok(_) => {}
            // A lagging replica may serve an older one: not an attack by itself. One from the
            // future was logged and is reported by `status`.
            Err(e) => tracing::debug!(error = %e, "timestamp not taken"),
        }
        self.newer_root_announced()
    }

    /// Subscribes to the trust bucket's updates (a plain subscription to the subjects the server
    /// republishes its writes on, as for desired states), then reads what is published: roots walked in order, the
    /// timestamp. When this returns the trust is as current as the store, so a caller can
    /// judge announcements at once; [`Following::run`] keeps it current.
    pub async fn start_following<S: TrustSource>(self: Arc<Self>, bus: S) -> Following<S> {
        let mut connections = bus.connections();
        connections.mark_unchanged();
        let updates = self.subscribe_and_refresh(&bus).await;
        Following {
            trust: self,
            bus,
            connections,
            updates,
        }
    }

    /// Subscribes first, then reads the store, so nothing published in between is missed.
    /// `None`: the subscription failed (the store was still read).
    async fn subscribe_and_refresh(
        &self,
        bus: &impl TrustSource,
    ) -> Option<async_nats::Subscriber> {
        let updates = bus
            .client()
            .subscribe(format!("{TRUST_SUBJECT_PREFIX}>"))
            .await
            .map_err(|e| tracing::warn!(error = %e, "cannot subscribe to trust updates, retrying"))
            .ok();
        if let Err(e) = self.refresh(bus).await {
            tracing::warn!(error = %e, "trust not refreshed");
        }
        updates
    }
}

/// Where a verifier follows the trust bucket from: a service's [`TrustBucket`] or an
/// agent's [`AgentBus`] (direct gets only, see `agent_bus`).
pub trait TrustSource: Send + Sync + 'static {
    fn client(&self) -> &async_nats::Client;
    fn connections(&self) -> tokio::sync::watch::Receiver<u64>;
    /// A key's value; `None` when absent or deleted.
    fn get(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<bytes::Bytes>, async_nats::Error>> + Send;
}

/// A service's handle on the trust bucket: roots and the signer's timestamp.
#[derive(Clone)]
pub struct TrustBucket {
    bus: Bus,
    kv: async_nats::jetstream::kv::Store,
}

impl TrustBucket {
    pub async fn bind(bus: &Bus) -> Result<TrustBucket, crate::BusError> {
        Ok(TrustBucket {
            bus: bus.clone(),
            kv: bus.bucket(fleetcast_events::names::TRUST_BUCKET).await?,
        })
    }

    /// The bucket itself (the signer writes the timestamp, operators the roots).
    pub fn store(&self) -> &async_nats::jetstream::kv::Store {
        &self.kv
    }
}

impl TrustSource for TrustBucket {
    fn client(&self) -> &async_nats::Client {
        &self.bus.client
    }
    fn connections(&self) -> tokio::sync::watch::Receiver<u64> {
        self.bus.connections.clone()
    }
    async fn get(&self, key: &str) -> Result<Option<bytes::Bytes>, async_nats::Error> {
        Ok(self.kv.get(key).await?)
    }
}

impl TrustSource for AgentBus {
    fn client(&self) -> &async_nats::Client {
        &self.client
    }
    fn connections(&self) -> tokio::sync::watch::Receiver<u64> {
        self.connections.clone()
    }
    async fn get(&self, key: &str) -> Result<Option<bytes::Bytes>, async_nats::Error> {
        Ok(self.trust.get(key).await?)
    }
}

/// A verifier's trust being kept current (see [`Trust::start_following`]).
pub struct Following<S = TrustBucket> {
    trust: Arc<Trust>,
    bus: S,
    connections: tokio::sync::watch::Receiver<u64>,
    updates: Option<async_nats::Subscriber>,
}

impl<S: TrustSource> Following<S> {
    /// Until `shutdown`: new roots and timestamps as they are published, a full refresh after
    /// every reconnect and every `recheck`.
    pub async fn run(self, recheck: Duration, shutdown: CancellationToken) {
        let Following {
            trust,
            bus,
            mut connections,
            mut updates,
        } = self;
        let timestamp_subject = format!("{TRUST_SUBJECT_PREFIX}{TIMESTAMP_KEY}");
        let recheck = recheck.max(Duration::from_secs(1));
        // The first re-check one period from now: the store was just read.
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + recheck, recheck);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut subscription = match updates.take() {
                Some(s) => s,
                None => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    connections.mark_unchanged();
                    updates = trust.subscribe_and_refresh(&bus).await;
                    continue;
                }
            };
            loop {
                let refresh = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    message = subscription.next() => match message {
                        // A timestamp naming a newer root than held: walk to it.
                        Some(m) if m.subject.as_str() == timestamp_subject => {
                            trust.take_timestamp(&m.payload)
                        }
                        // A new root: walk to it in order (it may not be the next one).
                        Some(_) => true,
                        // The subscription ended: make it again.
                        None => break,
                    },
                    changed = connections.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        true
                    }
                    _ = ticker.tick() => true,
                };
                if refresh && let Err(e) = trust.refresh(&bus).await {
                    tracing::warn!(error = %e, "trust not refreshed");
                }
            }
        }
    }
}

/// The chain from the configured `first` root through the roots saved in `dir`: each taken
/// only as the next version signed by its predecessor's root keys (and its own). A saved root
/// that does not chain (a higher version signed only by its own keys, or one the chain never
/// reaches) is refused and noted; the walk stops at the last link that verified, and the
/// published rotations are followed again from there.
fn walk_saved_roots(first: TrustedRoot, dir: &Path, notes: &mut Vec<String>) -> TrustedRoot {
    let mut saved: BTreeMap<u64, Vec<(PathBuf, SignedMetadata)>> = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return first,
        Err(e) => {
            notes.push(format!("saved roots in {}: {e}", dir.display()));
            return first;
        }
    };
    for entry in entries.flatten().take(MAX_SAVED_ROOTS * 2) {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let named_version = name
            .strip_prefix("root.")
            .and_then(|rest| rest.strip_suffix(".json"))
            .and_then(|v| v.parse::<u64>().ok());
        if named_version.is_none() && name != LEGACY_ROOT_FILE {
            continue;
        }
        let path = entry.path();
        let read = read_metadata(&path).and_then(|signed| {
            let root: fleetcast_events::Root = signed.unverified()?;
            Ok((root.version, signed))
        });
        match read {
            // The version inside is what counts; a file named for another one is only
            // mislabelled (the chain check decides).
            Ok((version, signed)) => saved.entry(version).or_default().push((path, signed)),
            Err(e) => notes.push(format!("saved root {} refused: {e}", path.display())),
        }
    }
    let mut current = first;
    let configured = current.version();
    while let Some(next) = current.version().checked_add(1) {
        let Some(candidates) = saved.remove(&next) else {
            break;
        };
        let mut refused = Vec::new();
        let mut taken = None;
        for (path, signed) in candidates {
            match current.next(&signed) {
                Ok(root) if taken.is_none() => taken = Some(root),
                Ok(_) => {}
                Err(e) => refused.push(format!("{}: {e}", path.display())),
            }
        }
        match taken {
            Some(root) => current = root,
            None => {
                for why in refused {
                    notes.push(format!(
                        "saved root version {next} refused: it does not chain from the configured root (version {configured}) through the saved roots ({why}); following the published rotations from version {}",
                        current.version()
                    ));
                }
                break;
            }
        }
    }
    for (version, candidates) in saved.range(current.version().saturating_add(1)..) {
        for (path, _) in candidates {
            notes.push(format!(
                "saved root version {version} ({}) refused: the chain from the configured root (version {configured}) reaches only version {}; following the published rotations from there",
                path.display(),
                current.version()
            ));
        }
    }
    for note in notes.iter() {
        tracing::warn!(%note, "trust state refused");
    }
    current
}

/// The apps whose accepted version is older than the newest the signer's timestamp lists, each
/// with that version and since when it has been behind (kept from `state` while it stays
/// behind, whichever newer version it lags); and a note for each behind for longer than
/// `max_age`.
fn behind_the_signer(
    state: &State,
    now: OffsetDateTime,
    max_age: Option<Duration>,
    accepted: &[(fleetcast_events::AppName, Option<Version>)],
) -> (
    BTreeMap<fleetcast_events::AppName, (Version, OffsetDateTime)>,
    Vec<String>,
) {
    let mut behind = BTreeMap::new();
    let mut notes = Vec::new();
    let Some(timestamp) = &state.timestamp else {
        return (behind, notes);
    };
    for (app, accepted) in accepted {
        let Some(newest) = timestamp.releases.get(app.as_str()) else {
            continue;
        };
        if accepted.as_ref().is_some_and(|a| a >= newest) {
            continue;
        }
        let since = state
            .behind
            .get(app.as_str())
            .map_or(now, |(_, since)| *since);
        behind.insert(app.clone(), (newest.clone(), since));
        let lag = Duration::try_from(now - since).unwrap_or_default();
        if let Some(max_age) = max_age
            && lag > max_age
        {
            notes.push(format!(
                "{app}: {newest} is signed (the signer's timestamp), this host accepted {} and has been behind for {}s (limit {}s): its announcement may be withheld, or its ring is not due yet",
                accepted
                    .as_ref()
                    .map_or_else(|| "none".to_string(), Version::to_string),
                lag.as_secs(),
                max_age.as_secs()
            ));
        }
    }
    (behind, notes)
}

fn read_root(path: &Path) -> Result<TrustedRoot, MetadataError> {
    Ok(TrustedRoot::bootstrap(&read_metadata(path)?)?)
}

fn read_metadata(path: &Path) -> Result<SignedMetadata, MetadataError> {
    Ok(decode(&std::fs::read(path)?)?)
}

fn decode(bytes: &[u8]) -> Result<SignedMetadata, serde_json::Error> {
    serde_json::from_slice(bytes)
}

/// Why a root or timestamp (from a file or the bus) is not taken.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("{0}")]
    Read(#[from] std::io::Error),
    #[error("not signed metadata: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("{0}")]
    Refused(#[from] TrustError),
}

/// Why following the published trust metadata stopped short: the store could not be read
/// (the next refresh tries again) or held metadata that is refused (it stays refused until
/// something newer is published).
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("{key}: cannot read: {source}")]
    Unreadable {
        key: String,
        source: async_nats::Error,
    },
    #[error("{key} refused: {source}")]
    Refused { key: String, source: MetadataError },
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_events::{Role, Root, SecretKey};
    use std::collections::BTreeMap;

    fn role(keys: &[&SecretKey]) -> Role {
        Role {
            keys: keys.iter().map(|k| k.public().to_text()).collect(),
            threshold: 1,
        }
    }

    #[test]
    fn rotation_is_persisted_and_timestamps_only_move_forward() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root_key = SecretKey::generate().expect("key");
        let old = SecretKey::generate().expect("key");
        let new = SecretKey::generate().expect("key");
        let now = OffsetDateTime::now_utc();
        let root = |version, signing: &SecretKey| Root {
            version,
            expires: now + time::Duration::days(30),
            root: role(&[&root_key]),
            signing: role(&[signing]),
        };
        let r1 = SignedMetadata::sign(&root(1, &old), &[&root_key]).expect("sign");
        let first = dir.path().join("root-1.json");
        std::fs::write(&first, serde_json::to_vec(&r1).expect("json")).expect("write");
        let state = dir.path().join("trust");
        let trust = Trust::load(&[], &[], Some(&first), Some(&state)).expect("load");
        assert_eq!(trust.root_version(), 1);
        let r2 = SignedMetadata::sign(&root(2, &new), &[&root_key]).expect("sign");
        assert_eq!(trust.apply_root(&r2), Ok(true));
        assert!(
            trust
                .keys(now)
                .expect("keys")
                .get(&old.public().id())
                .is_none()
        );

        let ts = |issued, key: &SecretKey| {
            let t = Timestamp {
                issued,
                expires: issued + time::Duration::hours(1),
                root_version: 2,
                releases: BTreeMap::new(),
            };
            SignedMetadata::sign(&t, &[key]).expect("sign")
        };
        assert!(matches!(
            trust.apply_timestamp(&ts(now, &old), now),
            Err(TrustError::UnknownKey(_))
        ));
        assert_eq!(trust.apply_timestamp(&ts(now, &new), now), Ok(true));
        let earlier = now - time::Duration::minutes(1);
        assert!(matches!(
            trust.apply_timestamp(&ts(earlier, &new), now),
            Err(TrustError::TimestampReplayed { .. })
        ));
        assert!(!trust.status(now, Some(Duration::from_secs(60)), &[]).stale);
        let later = now + time::Duration::minutes(5);
        let status = trust.status(later, Some(Duration::from_secs(60)), &[]);
        assert!(status.stale, "{status:?}");

        // Restarted from the same config: the rotation and the timestamp are remembered.
        let again = Trust::load(&[], &[], Some(&first), Some(&state)).expect("reload");
        assert_eq!(again.root_version(), 2);
        assert!(matches!(
            again.apply_timestamp(&ts(earlier, &new), now),
            Err(TrustError::TimestampReplayed { .. })
        ));
    }

    /// A configured first root (root keys `root_keys`, signing key `signing`) in `dir`, and the
    /// helpers to make the roots and timestamps of one deployment.
    struct Fixture {
        dir: tempfile::TempDir,
        root_keys: SecretKey,
        signing: SecretKey,
        now: OffsetDateTime,
    }

    impl Fixture {
        fn new() -> Fixture {
            let f = Fixture {
                dir: tempfile::tempdir().expect("tempdir"),
                root_keys: SecretKey::generate().expect("key"),
                signing: SecretKey::generate().expect("key"),
                now: OffsetDateTime::now_utc(),
            };
            let r1 = f.root(1, &f.root_keys, &f.signing, &[&f.root_keys]);
            std::fs::write(f.first(), serde_json::to_vec(&r1).expect("json")).expect("write");
            f
        }

        fn first(&self) -> PathBuf {
            self.dir.path().join("root-1.json")
        }

        fn state(&self) -> PathBuf {
            self.dir.path().join("trust")
        }

        fn root(
            &self,
            version: u64,
            root_key: &SecretKey,
            signing: &SecretKey,
            by: &[&SecretKey],
        ) -> SignedMetadata {
            let root = Root {
                version,
                expires: self.now + time::Duration::days(30),
                root: role(&[root_key]),
                signing: role(&[signing]),
            };
            SignedMetadata::sign(&root, by).expect("sign")
        }

        fn timestamp(
            &self,
            issued: OffsetDateTime,
            root_version: u64,
            releases: &[(&str, &str)],
            key: &SecretKey,
        ) -> SignedMetadata {
            let t = Timestamp {
                issued,
                expires: issued + time::Duration::hours(1),
                root_version,
                releases: releases
                    .iter()
                    .map(|(app, v)| (app.to_string(), Version::parse(v).expect("version")))
                    .collect(),
            };
            SignedMetadata::sign(&t, &[key]).expect("sign")
        }

        fn load(&self, now: OffsetDateTime) -> Trust {
            Trust::load_with(
                &[],
                &[],
                Some(&self.first()),
                Some(&self.state()),
                DEFAULT_MAX_CLOCK_SKEW,
                now,
            )
            .expect("load")
        }

        fn write_state(&self, file: &str, signed: &SignedMetadata) {
            std::fs::write(
                self.state().join(file),
                serde_json::to_vec(signed).expect("json"),
            )
            .expect("write");
        }
    }

    fn noted(status: &MetadataStatus, what: &str) -> bool {
        status.notes.iter().any(|n| n.contains(what))
    }

    /// An app running as the agent's user writes a root of a higher version signed only by its
    /// own keys (naming its own signing key): refused at the next start, reported, and the
    /// verifier stays on the chain from the configured root.
    #[test]
    fn a_saved_root_not_chained_to_the_configured_one_is_refused() {
        let f = Fixture::new();
        let trust = f.load(f.now);
        let new_root_key = SecretKey::generate().expect("key");
        let r2 = f.root(2, &new_root_key, &f.signing, &[&f.root_keys, &new_root_key]);
        assert_eq!(trust.apply_root(&r2), Ok(true));
        assert!(f.state().join("root.2.json").is_file());

        let attacker = SecretKey::generate().expect("key");
        let forged = f.root(3, &attacker, &attacker, &[&attacker]);
        f.write_state("root.3.json", &forged);
        // The file name fleetcast 0.2 used, at a version far ahead.
        f.write_state("root.json", &f.root(9, &attacker, &attacker, &[&attacker]));
        let again = f.load(f.now);
        assert_eq!(again.root_version(), 2, "the chain ends at the real root 2");
        let status = again.status(f.now, None, &[]);
        assert!(noted(&status, "saved root version 3 refused"), "{status:?}");
        assert!(noted(&status, "saved root version 9"), "{status:?}");
        // The forged root's signing key signs nothing the verifier accepts.
        let keys = again.keys(f.now).expect("keys");
        assert!(keys.get(&attacker.public().id()).is_none());
        assert!(keys.get(&f.signing.public().id()).is_some());

        // The real root 2 replaced by a forged one: back to the configured root, from where
        // the published rotations are followed again.
        f.write_state(
            "root.2.json",
            &f.root(2, &attacker, &attacker, &[&attacker]),
        );
        let fallen_back = f.load(f.now);
        assert_eq!(fallen_back.root_version(), 1);
        let status = fallen_back.status(f.now, None, &[]);
        assert!(noted(&status, "saved root version 2 refused"), "{status:?}");
        assert_eq!(fallen_back.apply_root(&r2), Ok(true));
        assert_eq!(fallen_back.root_version(), 2);
    }

    /// A saved timestamp whose text was changed (or that an unknown key signed) is not taken
    /// at start: it neither makes the verifier read as fresh nor sets the replay floor.
    #[test]
    fn a_tampered_saved_timestamp_is_refused() {
        let f = Fixture::new();
        let trust = f.load(f.now);
        let ts = f.timestamp(f.now, 1, &[], &f.signing);
        assert_eq!(trust.apply_timestamp(&ts, f.now), Ok(true));
        assert_eq!(f.load(f.now).timestamp().map(|t| t.issued), Some(f.now));

        // Issued a day later, so the agent would read as fresh for a day, and refuse every
        // real timestamp until then as replayed.
        let mut tampered = ts.clone();
        let later = (f.now + time::Duration::days(1))
            .format(&time::format_description::well_known::Rfc3339)
            .expect("format");
        let issued = f
            .now
            .format(&time::format_description::well_known::Rfc3339)
            .expect("format");
        tampered.signed = tampered.signed.replace(&issued, &later);
        assert_ne!(tampered.signed, ts.signed);
        f.write_state(TIMESTAMP_FILE, &tampered);
        let again = f.load(f.now);
        assert_eq!(again.timestamp(), None);
        let status = again.status(f.now, None, &[]);
        assert!(noted(&status, "saved timestamp"), "{status:?}");
        assert!(noted(&status, "does not match"), "{status:?}");
        // A real timestamp is taken (no floor was set by the tampered one).
        let next = f.timestamp(f.now + time::Duration::minutes(1), 1, &[], &f.signing);
        assert_eq!(
            again.apply_timestamp(&next, f.now + time::Duration::minutes(1)),
            Ok(true)
        );

        let attacker = SecretKey::generate().expect("key");
        f.write_state(TIMESTAMP_FILE, &f.timestamp(f.now, 1, &[], &attacker));
        let status = f.load(f.now).status(f.now, None, &[]);
        assert!(noted(&status, "not trusted"), "{status:?}");
    }

    /// A timestamp issued beyond the tolerance ahead of the verifier's clock is refused and
    /// makes the verifier report itself stale (before, its age counted as 0: fresh forever);
    /// one within the tolerance is taken. The same refusal is what an agent whose clock runs
    /// behind sees, and it says so.
    #[test]
    fn a_future_timestamp_beyond_tolerance_is_refused_and_reported() {
        let f = Fixture::new();
        let trust = f.load(f.now);
        let max_age = Some(Duration::from_secs(15 * 60));
        let skew = time::Duration::try_from(DEFAULT_MAX_CLOCK_SKEW).expect("skew");
        let far = f.timestamp(
            f.now + skew + time::Duration::seconds(1),
            1,
            &[],
            &f.signing,
        );
        assert!(matches!(
            trust.apply_timestamp(&far, f.now),
            Err(TrustError::FromTheFuture { .. })
        ));
        assert_eq!(trust.timestamp(), None);
        let status = trust.status(f.now, max_age, &[]);
        assert!(status.stale, "{status:?}");
        let reason = status.reason.unwrap_or_default();
        assert!(reason.contains("ahead of this host's clock"), "{reason}");

        let near = f.timestamp(
            f.now + skew - time::Duration::seconds(1),
            1,
            &[],
            &f.signing,
        );
        assert_eq!(trust.apply_timestamp(&near, f.now), Ok(true));
        let status = trust.status(f.now, max_age, &[]);
        assert!(!status.stale, "within the tolerance: {status:?}");

        // Saved and read back at a start whose clock is far behind: refused and reported too.
        let behind = f.now - time::Duration::hours(2);
        let restarted = f.load(behind);
        assert_eq!(restarted.timestamp(), None);
        let status = restarted.status(behind, max_age, &[]);
        assert!(status.stale, "{status:?}");
        assert!(noted(&status, "ahead of this clock"), "{status:?}");
    }

    /// The signer's clock is right and this host's runs an hour behind: every timestamp the
    /// signer issues is "from the future" here. Before, they were taken, the age read as 0 and
    /// every expiry was silently an hour longer; now the host reports its clock, and expiries
    /// are judged with the tolerance only.
    #[test]
    fn an_agent_clock_behind_by_more_than_the_tolerance_is_reported() {
        let f = Fixture::new();
        let trust = f.load(f.now);
        let signer_now = f.now + time::Duration::hours(1);
        let ts = f.timestamp(signer_now, 1, &[], &f.signing);
        assert!(trust.apply_timestamp(&ts, f.now).is_err());
        let status = trust.status(f.now, Some(Duration::from_secs(900)), &[]);
        assert!(status.stale, "{status:?}");
        assert!(
            status
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("3600s ahead") && r.contains("clock is behind")),
            "{status:?}"
        );
        // The clock fixed: the next timestamp is taken and the report clears.
        let fixed = signer_now + time::Duration::minutes(1);
        let next = f.timestamp(fixed, 1, &[], &f.signing);
        assert_eq!(trust.apply_timestamp(&next, fixed), Ok(true));
        assert!(
            !trust
                .status(fixed, Some(Duration::from_secs(900)), &[])
                .stale
        );

        // Expiries with the tolerance: a timestamp expired a minute ago by this clock is still
        // taken (another clock within the tolerance may not have passed it), one expired longer
        // ago than the tolerance is not.
        let g = Fixture::new();
        let trust = g.load(g.now);
        // Both expire (after their hour) 1 s after `g.now`.
        let issued = g.now - time::Duration::hours(1) + time::Duration::seconds(1);
        let expired_a_minute = g.timestamp(issued, 1, &[], &g.signing);
        assert_eq!(
            trust.apply_timestamp(&expired_a_minute, g.now + time::Duration::minutes(1)),
            Ok(true)
        );
        let expired_long = g.timestamp(issued + time::Duration::seconds(1), 1, &[], &g.signing);
        assert!(matches!(
            trust.apply_timestamp(&expired_long, g.now + time::Duration::minutes(6)),
            Err(TrustError::Expired(_))
        ));
    }

    /// The timestamp's releases map: an app whose accepted version stays behind the newest one
    /// signed for longer than `max_metadata_age` is reported; a newer root named by the
    /// timestamp that the verifier cannot reach makes it stale.
    #[test]
    fn freshness_reads_the_timestamps_releases_and_root_version() {
        let f = Fixture::new();
        let trust = f.load(f.now);
        let max_age = Some(Duration::from_secs(60));
        let ts = f.timestamp(
            f.now,
            1,
            &[("shapp", "2.0.0"), ("other", "1.0.0")],
            &f.signing,
        );
        assert_eq!(trust.apply_timestamp(&ts, f.now), Ok(true));
        let accepted = |v: &str| {
            vec![
                (
                    fleetcast_events::AppName::from_static("shapp"),
                    Some(Version::parse(v).expect("v")),
                ),
                (
                    fleetcast_events::AppName::from_static("other"),
                    Some(Version::new(1, 0, 0)),
                ),
            ]
        };
        let status = trust.status(f.now, max_age, &accepted("1.0.0"));
        assert!(
            status.notes.is_empty() && !status.stale,
            "behind only now: {status:?}"
        );
        let later = f.now + time::Duration::seconds(59);
        let next = f.timestamp(later, 1, &[("shapp", "2.0.0")], &f.signing);
        assert_eq!(trust.apply_timestamp(&next, later), Ok(true));
        assert!(
            trust
                .status(later, max_age, &accepted("1.0.0"))
                .notes
                .is_empty()
        );
        let too_long = f.now + time::Duration::seconds(61);
        let status = trust.status(too_long, max_age, &accepted("1.0.0"));
        assert!(noted(&status, "shapp: 2.0.0 is signed"), "{status:?}");
        assert!(!noted(&status, "other"), "{status:?}");
        // Caught up: nothing to report, and the lag starts again from zero next time.
        assert!(
            trust
                .status(too_long, max_age, &accepted("2.0.0"))
                .notes
                .is_empty()
        );
        assert!(
            trust
                .status(too_long, max_age, &accepted("1.0.0"))
                .notes
                .is_empty()
        );

        let ahead = f.timestamp(too_long, 2, &[], &f.signing);
        assert_eq!(trust.apply_timestamp(&ahead, too_long), Ok(true));
        assert!(trust.newer_root_announced());
        let status = trust.status(too_long, max_age, &[]);
        assert!(status.stale, "{status:?}");
        assert!(
            status
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("root version 2")),
            "{status:?}"
        );
    }
}
