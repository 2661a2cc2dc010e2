//! A verifier's trust (the agent's, the distributor's, the signer's own check): either keys
//! pinned in its settings, or a root it walks forward from as operators publish new ones
//! (`root.<N>` in the trust bucket), plus the freshest timestamp the signer published. With a
//! state folder (the agent's, outside its install folders) both are written on every change
//! and read back at start, so a restarted verifier neither forgets a rotation nor accepts an
//! older timestamp than it saw.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetcast_events::names::{TIMESTAMP_KEY, TRUST_SUBJECT_PREFIX, root_key};
use fleetcast_events::v1::MetadataStatus;
use fleetcast_events::{SignedMetadata, Timestamp, TrustError, TrustedKeys, TrustedRoot};
use futures::StreamExt;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::settings::SettingsError;
use crate::{AgentBus, Bus};

/// How often a service (signer, distributor) reads the trust bucket again behind the
/// subscription; agents use their own `recheck`.
pub const SERVICE_RECHECK: Duration = Duration::from_secs(300);

const ROOT_FILE: &str = "root.json";
const TIMESTAMP_FILE: &str = "timestamp.json";
/// A walk forward stops after this many roots at once (a hostile store cannot keep a verifier
/// busy forever; the next refresh goes on from there).
const MAX_ROOTS_PER_REFRESH: u64 = 64;

pub struct Trust {
    state: Mutex<State>,
    /// The root version, changed on every rotation (see [`Trust::root_updates`]).
    roots: tokio::sync::watch::Sender<u64>,
    dir: Option<PathBuf>,
    started: OffsetDateTime,
}

struct State {
    anchor: Anchor,
    timestamp: Option<Timestamp>,
}

enum Anchor {
    Pinned(TrustedKeys),
    Root(TrustedRoot),
}

impl Trust {
    /// From a verifier's settings: its first root (`root_file`), else its pinned keys. With
    /// `dir`, the root and timestamp reached before are read back from it.
    pub fn load(
        pinned_keys: &[String],
        pinned_key_files: &[PathBuf],
        root_file: Option<&Path>,
        dir: Option<&Path>,
    ) -> Result<Trust, SettingsError> {
        let anchor = match root_file {
            None => Anchor::Pinned(crate::settings::trusted_keys(
                pinned_keys,
                pinned_key_files,
            )?),
            Some(path) => {
                let fail = |reason: String| SettingsError::Value {
                    key: "trusted_root_file".into(),
                    reason: format!("{}: {reason}", path.display()),
                };
                let first = read_root(path).map_err(fail)?;
                // The persisted root was reached from a root like `first` through signed
                // rotations; a newer one replaces `first`, an older one (the config moved on)
                // does not.
                let persisted = dir
                    .map(|d| d.join(ROOT_FILE))
                    .filter(|p| p.is_file())
                    .map(|p| read_root(&p))
                    .transpose()
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "persisted root unreadable; starting from the configured one");
                        None
                    });
                match persisted {
                    Some(root) if root.version() > first.version() => Anchor::Root(root),
                    _ => Anchor::Root(first),
                }
            }
        };
        let timestamp = dir
            .map(|d| d.join(TIMESTAMP_FILE))
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|bytes| serde_json::from_slice::<SignedMetadata>(&bytes).ok())
            .and_then(|signed| signed.unverified::<Timestamp>().ok());
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
        Ok(Trust {
            roots: tokio::sync::watch::Sender::new(version),
            state: Mutex::new(State { anchor, timestamp }),
            dir: dir.map(Path::to_path_buf),
            started: OffsetDateTime::now_utc(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned one is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The keys that must sign manifests and timestamps now.
    pub fn keys(&self, now: OffsetDateTime) -> Result<TrustedKeys, TrustError> {
        match &self.state().anchor {
            Anchor::Pinned(keys) => Ok(keys.clone()),
            Anchor::Root(root) => root.signing_keys(now).cloned(),
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
        self.persist(ROOT_FILE, next.signed());
        let version = next.version();
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

    /// The signer's timestamp: taken when signed by the current signing keys, not expired and
    /// newer than the one held.
    pub fn apply_timestamp(
        &self,
        signed: &SignedMetadata,
        now: OffsetDateTime,
    ) -> Result<bool, TrustError> {
        let keys = self.keys(now)?;
        let timestamp = signed.verify_timestamp(&keys, now)?;
        let mut state = self.state();
        if let Some(held) = &state.timestamp {
            if held.issued == timestamp.issued {
                return Ok(false);
            }
            if held.issued > timestamp.issued {
                return Err(TrustError::TimestampReplayed {
                    found: timestamp.issued.to_string(),
                    seen: held.issued.to_string(),
                });
            }
        }
        self.persist(TIMESTAMP_FILE, signed);
        state.timestamp = Some(timestamp);
        Ok(true)
    }

    pub fn timestamp(&self) -> Option<Timestamp> {
        self.state().timestamp.clone()
    }

    /// What the verifier reports about its metadata. Stale: the freshest timestamp it holds
    /// was issued longer than `max_age` ago (or none came in `max_age` since it started), or
    /// its root expired.
    pub fn status(&self, now: OffsetDateTime, max_age: Option<Duration>) -> MetadataStatus {
        let root_version = self.root_version();
        let issued = self.state().timestamp.as_ref().map(|t| t.issued);
        let mut reason = self.keys(now).err().map(|e| e.to_string());
        if let (None, Some(max_age)) = (&reason, max_age) {
            let since = issued.unwrap_or(self.started);
            let age = Duration::try_from(now - since).unwrap_or_default();
            if age > max_age {
                reason = Some(match issued {
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
        MetadataStatus {
            root_version,
            timestamp: issued,
            stale: reason.is_some(),
            reason,
        }
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
    async fn refresh(&self, store: &impl TrustSource) -> Result<(), String> {
        for _ in 0..MAX_ROOTS_PER_REFRESH {
            if matches!(self.state().anchor, Anchor::Pinned(_)) {
                break;
            }
            let Some(next) = self.root_version().checked_add(1) else {
                break;
            };
            let key = root_key(next);
            let Some(bytes) = store.get(&key).await.map_err(|e| format!("{key}: {e}"))? else {
                break;
            };
            let signed = decode(&bytes).map_err(|e| format!("{key}: {e}"))?;
            self.apply_root(&signed)
                .map_err(|e| format!("{key} refused: {e}"))?;
        }
        let Some(bytes) = store
            .get(TIMESTAMP_KEY)
            .await
            .map_err(|e| format!("{TIMESTAMP_KEY}: {e}"))?
        else {
            return Ok(());
        };
        self.take_timestamp(&bytes);
        Ok(())
    }

    fn take_timestamp(&self, bytes: &[u8]) {
        match decode(bytes).and_then(|s| {
            self.apply_timestamp(&s, OffsetDateTime::now_utc())
                .map_err(|e| e.to_string())
        }) {
            Ok(_) => {}
            // A lagging replica may serve an older one: not an attack by itself.
            Err(e) => tracing::debug!(error = %e, "timestamp not taken"),
        }
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

/// Where a verifier follows the trust bucket from: a service's [`Bus`] (a `kv::Store`) or an
/// agent's [`AgentBus`] (direct gets only, see `agent_bus`).
pub trait TrustSource: Send + Sync + 'static {
    fn client(&self) -> &async_nats::Client;
    fn connections(&self) -> tokio::sync::watch::Receiver<u64>;
    /// A key's value; `None` when absent or deleted.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<bytes::Bytes>, String>> + Send;
}

impl TrustSource for Bus {
    fn client(&self) -> &async_nats::Client {
        &self.client
    }
    fn connections(&self) -> tokio::sync::watch::Receiver<u64> {
        self.connections.clone()
    }
    async fn get(&self, key: &str) -> Result<Option<bytes::Bytes>, String> {
        self.trust.get(key).await.map_err(|e| e.to_string())
    }
}

impl TrustSource for AgentBus {
    fn client(&self) -> &async_nats::Client {
        &self.client
    }
    fn connections(&self) -> tokio::sync::watch::Receiver<u64> {
        self.connections.clone()
    }
    async fn get(&self, key: &str) -> Result<Option<bytes::Bytes>, String> {
        self.trust.get(key).await.map_err(|e| e.to_string())
    }
}

/// A verifier's trust being kept current (see [`Trust::start_following`]).
pub struct Following<S = Bus> {
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
                        Some(m) if m.subject.as_str() == timestamp_subject => {
                            trust.take_timestamp(&m.payload);
                            false
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

fn read_root(path: &Path) -> Result<TrustedRoot, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let signed = decode(&bytes)?;
    TrustedRoot::bootstrap(&signed).map_err(|e| e.to_string())
}

fn decode(bytes: &[u8]) -> Result<SignedMetadata, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("not signed metadata: {e}"))
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
        assert!(!trust.status(now, Some(Duration::from_secs(60))).stale);
        let later = now + time::Duration::minutes(5);
        let status = trust.status(later, Some(Duration::from_secs(60)));
        assert!(status.stale, "{status:?}");

        // Restarted from the same config: the rotation and the timestamp are remembered.
        let again = Trust::load(&[], &[], Some(&first), Some(&state)).expect("reload");
        assert_eq!(again.root_version(), 2);
        assert!(matches!(
            again.apply_timestamp(&ts(earlier, &new), now),
            Err(TrustError::TimestampReplayed { .. })
        ));
    }
}
