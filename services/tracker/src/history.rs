//! The history: what fleetcast did and who asked, as entries on `fleetcast.v1.history.…`
//! ([`HistoryEntry`]) kept by a stream of their own for `history.retention`. The tracker is its
//! only writer: it sees every pipeline event (the releases stream), moves every rollout, hears
//! every host and takes every operator's command. The same subjects are the notifications
//! anyone may subscribe to (the webhooks forward them).
//!
//! Entries are published with a message id made of what they are about, so an event handled
//! twice (a redelivery, a tracker restarted mid-step) is recorded once.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull, stream};
use fleetcast_events::names::{self, HISTORY_STREAM, HISTORY_STREAM_SUBJECTS};
use fleetcast_events::v1::{
    EventRejected, HistoryEntry, HistoryKind, PackageDetected, PackageRejected, PackageSource,
    ReleasePublished, ReleaseRejected, ReleaseSigned, ReleaseStored, RollbackRequested,
    RollbackSigned,
};
use fleetcast_events::{AgentId, AppName, Encoding, RingName};
use fleetcast_runtime::Bus;
use futures::StreamExt;
use serde::Deserialize;
use time::OffsetDateTime;

use crate::rollout::{Phase, Rollout};

/// `[history]` of the tracker's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistorySettings {
    /// How long entries are kept.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// …and at most this many bytes of them (the oldest go first).
    pub max_bytes: i64,
}

impl Default for HistorySettings {
    fn default() -> Self {
        HistorySettings {
            retention: Duration::from_secs(365 * 24 * 3600),
            max_bytes: 1 << 30,
        }
    }
}

pub use fleetcast_events::tracker::HistoryQuery;

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 10_000;
/// A listing reads at most this many entries of its subjects, from the newest back: the
/// stream may hold years of them; a filter that matches few reads no more than this.
const SCAN_MAX: u64 = 200_000;

/// Why the history could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The stream could not be set up.
    #[error("history stream: {0}")]
    Setup(async_nats::Error),
    /// The stream could not be brought to the settings' retention.
    #[error("history stream: applying its retention: {0}")]
    Retention(async_nats::Error),
    /// An entry was not published (see [`HistoryError::is_transient`]).
    #[error("history entry not published: {0}")]
    Publish(fleetcast_runtime::BusError),
    /// The stream could not be read now (NATS unreachable).
    #[error("reading the history: {0}")]
    Read(async_nats::Error),
    #[error("reading the history: timed out")]
    ReadTimedOut,
    /// Not even tried: the tracker is cut off from NATS.
    #[error("the tracker is cut off from NATS")]
    CutOff,
}

impl HistoryError {
    /// Whether the same entry, recorded again later, may be recorded: NATS back, a leader
    /// elected. An entry that cannot be encoded never will be, and is not tried again (it
    /// would hold up every entry after it).
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            HistoryError::Publish(fleetcast_runtime::BusError::Encode { .. })
        )
    }
}

/// The history stream, made (or brought to the settings' limits) by the tracker.
pub struct History {
    js: jetstream::Context,
    bus: Bus,
}

impl History {
    /// Opens (creating when missing) the history stream, with as many replicas as the stream
    /// of release events `releases` (made with the deployment's replicas).
    pub async fn open(
        bus: &Bus,
        releases: &stream::Stream,
        settings: &HistorySettings,
    ) -> Result<History, HistoryError> {
        let config = stream::Config {
            name: HISTORY_STREAM.into(),
            description: Some("what fleetcast did and who asked (the tracker writes it)".into()),
            subjects: vec![HISTORY_STREAM_SUBJECTS.into()],
            max_age: settings.retention,
            max_bytes: settings.max_bytes,
            max_message_size: 64 * 1024,
            duplicate_window: Duration::from_secs(300),
            storage: stream::StorageType::File,
            num_replicas: releases.cached_info().config.num_replicas.max(1),
            ..Default::default()
        };
        let js = bus.js.clone();
        let mut existing = js
            .get_or_create_stream(config.clone())
            .await
            .map_err(|e| HistoryError::Setup(e.into()))?;
        let info = existing
            .info()
            .await
            .map_err(|e| HistoryError::Setup(e.into()))?;
        // A retention changed in the settings applies to the stream made before.
        if info.config.max_age != config.max_age || info.config.max_bytes != config.max_bytes {
            let updated = stream::Config {
                max_age: config.max_age,
                max_bytes: config.max_bytes,
                ..info.config.clone()
            };
            js.update_stream(&updated)
                .await
                .map_err(|e| HistoryError::Retention(e.into()))?;
            tracing::info!(retention = ?config.max_age, max_bytes = config.max_bytes, "history retention applied");
        }
        Ok(History {
            js,
            bus: bus.clone(),
        })
    }

    /// Publishes one entry (idempotent by `id` within the stream's duplicate window).
    pub async fn record(&self, entry: &HistoryEntry, id: &str) -> Result<(), HistoryError> {
        let kind = entry.kind.to_string();
        let subject = names::history_subject(entry.app.as_deref(), &kind);
        self.bus
            .publish_event(&subject, entry, Encoding::Json, Some(id))
            .await
            .map_err(HistoryError::Publish)
    }

    /// The newest entries the query matches, oldest first.
    pub async fn list(&self, query: &HistoryQuery) -> Result<Vec<HistoryEntry>, HistoryError> {
        let limit = query.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
        let filter = format!(
            "{}{}.{}",
            names::HISTORY_SUBJECT_PREFIX,
            query.app.as_deref().unwrap_or("*"),
            query
                .kind
                .map(|k| k.to_string())
                .unwrap_or_else(|| ">".into())
        );
        let mut stream = self
            .js
            .get_stream(HISTORY_STREAM)
            .await
            .map_err(|e| HistoryError::Read(e.into()))?;
        let last = stream
            .info()
            .await
            .map_err(|e| HistoryError::Read(e.into()))?
            .state
            .last_sequence;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: last.saturating_sub(SCAN_MAX).max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| HistoryError::Read(e.into()))?;
        let mut out = std::collections::VecDeque::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(Vec::new());
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| HistoryError::Read(e.into()))?;
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
            let msg = match next {
                Ok(Some(Ok(msg))) => msg,
                Ok(Some(Err(e))) => return Err(HistoryError::Read(e.into())),
                Ok(None) => break,
                Err(_) => return Err(HistoryError::ReadTimedOut),
            };
            let pending = msg.info().map(|i| i.pending).unwrap_or(0);
            if let Ok(entry) = serde_json::from_slice::<HistoryEntry>(&msg.payload)
                && matches(query, &entry)
            {
                out.push_back(entry);
                if out.len() > limit {
                    out.pop_front();
                }
            }
            if pending == 0 {
                break;
            }
        }
        // In the order things happened: two of the tracker's loops record concurrently (a
        // release's `release.stored` from the pipeline, its `rollout.started` from the
        // rollouts), so the stream's order may differ from the entries' times by a moment.
        let mut out: Vec<HistoryEntry> = out.into();
        out.sort_by_key(|e| e.at);
        Ok(out)
    }
}

/// What the subject filter cannot narrow.
fn matches(query: &HistoryQuery, entry: &HistoryEntry) -> bool {
    query
        .version
        .as_ref()
        .is_none_or(|v| entry.version.as_ref() == Some(v))
        && query
            .actor
            .as_ref()
            .is_none_or(|a| entry.actor.as_ref() == Some(a))
}

/// An entry to record, with the id that makes recording it idempotent.
pub type Pending = (HistoryEntry, String);

/// The history entry of an event of the releases stream received on `subject` at `at`
/// (`seq`: its stream sequence, which makes the id); `None` for subjects that are not history
/// (none today) or a payload that does not decode (the services refuse those themselves).
pub fn from_pipeline(
    subject: &str,
    payload: &[u8],
    headers: Option<&async_nats::HeaderMap>,
    at: OffsetDateTime,
    seq: u64,
) -> Option<Pending> {
    let event = Event { headers, payload };
    // Who announced a release or asked for a rollback is the user the subject names.
    let entry = if let Some(user) = names::subject_user(subject, names::RELEASE_PUBLISHED_PREFIX) {
        release_published(event.decode()?, user, at)
    } else if let Some(user) = names::subject_user(subject, names::ROLLBACK_REQUESTED_PREFIX) {
        rollback_requested(event.decode()?, user, at)
    } else {
        match subject {
            names::PACKAGE_DETECTED => package_detected(event.decode()?, at),
            names::PACKAGE_REJECTED => package_rejected(event.decode()?, at),
            names::RELEASE_SIGNED => release_signed(event.decode()?, at),
            names::RELEASE_REJECTED => release_rejected(event.decode()?, at),
            names::RELEASE_STORED => release_stored(event.decode()?, at),
            names::ROLLBACK_SIGNED => rollback_signed(event.decode()?, at),
            names::EVENT_REJECTED => event_rejected(event.decode()?, at),
            _ => return None,
        }
    };
    Some((entry, format!("pipeline:{seq}")))
}

/// A pipeline event as received, decoded as the type its subject says.
struct Event<'a> {
    headers: Option<&'a async_nats::HeaderMap>,
    payload: &'a [u8],
}

impl Event<'_> {
    fn decode<T: serde::de::DeserializeOwned>(&self) -> Option<T> {
        fleetcast_runtime::consume::decode_payload(self.headers, self.payload).ok()
    }
}

fn release_published(p: ReleasePublished, user: &str, at: OffsetDateTime) -> HistoryEntry {
    let mut e = HistoryEntry::new(HistoryKind::ReleasePublished, at);
    // A name that is no app's (refused by the watcher) cannot stand in a subject.
    e.app = AppName::try_from(p.app).ok();
    e.version = Some(p.version);
    e.blake3 = Some(p.blake3);
    e.actor = Some(user.to_string());
    e
}

fn rollback_requested(r: RollbackRequested, user: &str, at: OffsetDateTime) -> HistoryEntry {
    let mut e = HistoryEntry::new(HistoryKind::RollbackRequested, at);
    e.reason = Some(format!("from {} back to {}", r.from, r.to));
    e.app = Some(r.app);
    e.version = Some(r.to);
    e.ring = r.ring;
    e.actor = Some(user.to_string());
    e
}

fn package_detected(d: PackageDetected, at: OffsetDateTime) -> HistoryEntry {
    let mut e = HistoryEntry::new(HistoryKind::PackageDetected, at);
    e.actor = Some(source_actor(&d.source));
    e.app = Some(d.app);
    e.version = Some(d.version);
    e.blake3 = Some(d.blake3);
    e
}

fn package_rejected(r: PackageRejected, at: OffsetDateTime) -> HistoryEntry {
    let mut e = HistoryEntry::new(HistoryKind::PackageRejected, at);
    e.actor = Some(source_actor(&r.source));
    e.app = r.app;
    e.version = r.version;
    e.blake3 = r.blake3;
    e.code = Some(r.reason.code);
    e.reason = Some(r.reason.message);
    e
}

fn release_signed(s: ReleaseSigned, at: OffsetDateTime) -> HistoryEntry {
    let mut e = HistoryEntry::new(HistoryKind::ReleaseSigned, at);
    e.actor = Some("signer".into());
    e.app = Some(s.app);
    e.version = Some(s.version);
    e.blake3 = Some(s.blake3);
    e
}

fn release_rejected(r: ReleaseRejected, at: OffsetDateTime) -> HistoryEntry {
    let mut e = HistoryEntry::new(HistoryKind::ReleaseRejected, at);
    e.actor = Some(r.stage);
    e.app = Some(r.app);
    e.version = Some(r.version);
    e.blake3 = r.blake3;
    e.code = Some(r.reason.code);
    e.reason = Some(r.reason.message);
    e
}

fn release_stored(s: ReleaseStored, at: OffsetDateTime) -> HistoryEntry {
    let mut e = HistoryEntry::new(HistoryKind::ReleaseStored, at);
    e.actor = Some("distributor".into());
    e.reason = Some(format!(
        "{} files, {} chunks ({} new, {} bytes added)",
        s.files, s.chunks, s.new_chunks, s.new_stored_bytes
    ));
    e.app = Some(s.app);
    e.version = Some(s.version);
    e
}

fn rollback_signed(s: RollbackSigned, at: OffsetDateTime) -> HistoryEntry {
    let mut e = HistoryEntry::new(HistoryKind::RollbackSigned, at);
    e.actor = Some("signer".into());
    e.reason = Some(format!("from {} back to {}", s.from, s.to));
    e.app = Some(s.app);
    e.version = Some(s.to);
    e.ring = s.ring;
    e
}

fn event_rejected(r: EventRejected, at: OffsetDateTime) -> HistoryEntry {
    let mut e = HistoryEntry::new(HistoryKind::EventRejected, at);
    e.actor = Some(r.stage);
    e.code = Some(r.reason.code);
    e.reason = Some(format!("{}: {}", r.subject, r.reason.message));
    e
}

fn source_actor(source: &PackageSource) -> String {
    match source {
        PackageSource::DropFolder { .. } => "drop-folder".into(),
        // The watcher checked the event's publisher; the history has its own entry for the
        // announcement, with the user its subject names.
        PackageSource::Ci { .. } => "watcher".into(),
    }
}

/// What changed between a rollout as it was (`before`: `None` when there was none) and as it
/// is, as history entries: started, each ring started and completed, halted, completed,
/// aborted, a rollout superseded by this one. `rings` are the names of the rollout's rings.
pub fn transitions(
    before: Option<&Rollout>,
    after: &Rollout,
    rings: &[RingName],
    now: OffsetDateTime,
) -> Vec<Pending> {
    let entries = RolloutEntries { rings, now };
    // The same rollout moved on; else `after` took the app's place.
    let same = before.filter(|b| b.version == after.version && b.created == after.created);
    let mut out = Vec::new();
    if same.is_none() {
        out.extend(entries.replacing(before, after));
    }
    out.extend(entries.rings_moved(same, after));
    let phase_changed = same.is_none_or(|b| b.phase.kind() != after.phase.kind());
    if phase_changed {
        out.extend(entries.ended(after));
    }
    out
}

/// The history entries of a rollout's steps, by the tracker, at `now`.
struct RolloutEntries<'a> {
    /// The names of the rollout's rings, in order.
    rings: &'a [RingName],
    now: OffsetDateTime,
}

impl RolloutEntries<'_> {
    /// An entry about `r` (and its ring at `ring`), with an id made of what it says: a step
    /// replayed (a redelivery, a restart) is recorded once.
    fn entry(&self, kind: HistoryKind, r: &Rollout, ring: Option<usize>) -> Pending {
        let mut e = HistoryEntry::new(kind, self.now);
        e.app = Some(r.app.clone());
        e.version = Some(r.version.clone());
        e.actor = Some("tracker".into());
        e.ring = ring.and_then(|i| self.rings.get(i).cloned());
        let id = format!(
            "rollout:{}:{}:{}:{kind}:{}",
            r.app,
            r.version,
            r.created.unix_timestamp_nanos(),
            ring.map(|i| i.to_string()).unwrap_or_default()
        );
        (e, id)
    }

    /// `after` started, superseding `before` if that had not ended.
    fn replacing(&self, before: Option<&Rollout>, after: &Rollout) -> Vec<Pending> {
        let mut out = Vec::new();
        if let Some(old) = before.filter(|b| b.is_active()) {
            let (mut e, id) = self.entry(HistoryKind::RolloutSuperseded, old, None);
            e.reason = Some(format!("replaced by {}", after.version));
            out.push((e, id));
        }
        let (mut e, id) = self.entry(HistoryKind::RolloutStarted, after, None);
        e.reason = match (&after.directive, &after.phase) {
            (Some(_), _) => Some("rollback".into()),
            (None, Phase::AwaitingApproval { .. }) => Some("waiting for approval".into()),
            _ => None,
        };
        out.push((e, id));
        out
    }

    /// The rings `after` started and completed since it was `same` (`None`: it is new).
    fn rings_moved(&self, same: Option<&Rollout>, after: &Rollout) -> Vec<Pending> {
        let Some(last) = last_started(after) else {
            return Vec::new();
        };
        let was_started = same.and_then(last_started);
        let was_completed = same.and_then(last_completed);
        let now_completed = last_completed(after);
        let mut out = Vec::new();
        for i in 0..=last {
            if was_started.is_none_or(|s| i > s) {
                out.push(self.entry(HistoryKind::RingStarted, after, Some(i)));
            }
            if now_completed.is_some_and(|c| i <= c) && was_completed.is_none_or(|c| i > c) {
                out.push(self.entry(HistoryKind::RingCompleted, after, Some(i)));
            }
        }
        out
    }

    /// How `after` ended, with why, if it just did.
    fn ended(&self, after: &Rollout) -> Option<Pending> {
        let kind = match after.phase {
            Phase::Halted { .. } => HistoryKind::RolloutHalted,
            Phase::Completed => HistoryKind::RolloutCompleted,
            Phase::Aborted { .. } => HistoryKind::RolloutAborted,
            Phase::AwaitingApproval { .. } | Phase::Running { .. } => return None,
        };
        let (mut e, id) = self.entry(kind, after, Some(after.ring));
        e.reason = after.phase.reason().map(str::to_string);
        Some((e, id))
    }
}

/// The last ring started: every ring up to the current one, once the rollout left approval
/// (an abort starts none; the rings it had started were recorded before).
fn last_started(r: &Rollout) -> Option<usize> {
    (!matches!(
        r.phase,
        Phase::AwaitingApproval { .. } | Phase::Aborted { .. }
    ))
    .then_some(r.ring)
}

/// The last ring completed: the one before the current, or the current one once its hosts are
/// done (its soak then runs) or the rollout completed.
fn last_completed(r: &Rollout) -> Option<usize> {
    last_started(r)?;
    if r.phase == Phase::Completed || r.phase.ring_completed().is_some() {
        Some(r.ring)
    } else {
        r.ring.checked_sub(1)
    }
}

/// A host's failed update (rolled back by itself, or refused) of a rollout's version.
pub fn host_failed(
    rollout: &Rollout,
    agent: &AgentId,
    reason: &str,
    now: OffsetDateTime,
) -> Pending {
    let mut e = HistoryEntry::new(HistoryKind::HostRolledBack, now);
    e.app = Some(rollout.app.clone());
    e.version = Some(rollout.version.clone());
    e.agent = Some(agent.clone());
    e.reason = Some(reason.to_string());
    let id = format!(
        "host:{}:{}:{}:{agent}:{}",
        rollout.app,
        rollout.version,
        rollout.created.unix_timestamp_nanos(),
        blake3::hash(reason.as_bytes()).to_hex()
    );
    (e, id)
}

/// What the tracker did about `laggard` (`kind`), by itself: `<lag>: <what>`.
fn laggard_entry(
    kind: HistoryKind,
    laggard: &crate::laggards::Laggard,
    what: &str,
    now: OffsetDateTime,
) -> HistoryEntry {
    let mut e = HistoryEntry::new(kind, now);
    e.app = Some(laggard.app.clone());
    e.version = Some(laggard.version.clone());
    e.ring = Some(laggard.ring.clone());
    e.agent = Some(laggard.agent_id.clone());
    e.actor = Some("tracker".into());
    e.reason = Some(format!("{}: {what}", laggard.lag.kind()));
    e
}

/// A remedy sent to `laggard`'s agent.
pub fn host_remedied(
    laggard: &crate::laggards::Laggard,
    remedy: crate::laggards::Remedied,
    now: OffsetDateTime,
) -> Pending {
    let e = laggard_entry(HistoryKind::HostRemedied, laggard, remedy.said(), now);
    let id = format!(
        "remedy:{}:{}:{}:{remedy:?}",
        laggard.app, laggard.agent_id, laggard.version
    );
    (e, id)
}

/// A call of the replacement hook for `laggard` (or, in dry run, the call it would have been),
/// and how it ended.
pub fn host_replaced(
    laggard: &crate::laggards::Laggard,
    outcome: &str,
    now: OffsetDateTime,
) -> Pending {
    let e = laggard_entry(HistoryKind::HostReplaced, laggard, outcome, now);
    let id = format!(
        "replace:{}:{}:{}",
        laggard.app,
        laggard.agent_id,
        now.unix_timestamp_nanos()
    );
    (e, id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::AppPolicy;
    use fleetcast_events::AppName;

    fn kinds(entries: &[Pending]) -> Vec<String> {
        entries
            .iter()
            .map(|(e, _)| match &e.ring {
                Some(r) => format!("{} {r}", e.kind),
                None => e.kind.to_string(),
            })
            .collect()
    }

    fn rollout(now: OffsetDateTime) -> Rollout {
        Rollout::start(
            &AppName::from_static("web"),
            "1.0.0".parse().expect("version"),
            &AppPolicy::default(),
            now,
        )
        .0
    }

    const RINGS: [&str; 3] = ["canary", "early", "all"];

    fn rings() -> Vec<RingName> {
        RINGS.iter().map(|s| RingName::from_static(s)).collect()
    }

    #[test]
    fn a_new_rollout_starts_its_first_ring() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let r = rollout(now);
        assert_eq!(
            kinds(&transitions(None, &r, &rings(), now)),
            ["rollout.started", "ring.started canary"]
        );
    }

    #[test]
    fn rings_completed_and_started_in_order_then_completion() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let before = rollout(now);
        let mut r = before.clone();
        r.phase = Phase::Running {
            paused: false,
            ring_completed: Some(now),
        };
        assert_eq!(
            kinds(&transitions(Some(&before), &r, &rings(), now)),
            ["ring.completed canary"]
        );
        let mid = r.clone();
        // Chained: two rings at once (an empty ring with no soak).
        r.ring = 2;
        r.phase = Phase::RUNNING;
        assert_eq!(
            kinds(&transitions(Some(&mid), &r, &rings(), now)),
            [
                "ring.started early",
                "ring.completed early",
                "ring.started all"
            ]
        );
        let mid = r.clone();
        r.phase = Phase::Completed;
        assert_eq!(
            kinds(&transitions(Some(&mid), &r, &rings(), now)),
            ["ring.completed all", "rollout.completed all"]
        );
        // Nothing changed: nothing recorded.
        assert!(transitions(Some(&r), &r, &rings(), now).is_empty());
    }

    #[test]
    fn a_halt_carries_its_reason_and_a_replaced_rollout_is_superseded() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let before = rollout(now);
        let mut r = before.clone();
        r.phase = Phase::Halted {
            reason: "ring canary: 1 of 1 hosts failed".into(),
        };
        let out = transitions(Some(&before), &r, &rings(), now);
        assert_eq!(kinds(&out), ["rollout.halted canary"]);
        assert_eq!(out[0].0.reason.as_deref(), r.phase.reason());

        let later = now + time::Duration::seconds(5);
        let next = Rollout::start(
            &AppName::from_static("web"),
            "1.1.0".parse().expect("version"),
            &AppPolicy::default(),
            later,
        )
        .0;
        let out = transitions(Some(&before), &next, &rings(), later);
        assert_eq!(
            kinds(&out),
            [
                "rollout.superseded",
                "rollout.started",
                "ring.started canary"
            ]
        );
        assert_eq!(out[0].0.version, Some("1.0.0".parse().expect("version")));
        // A halted rollout replaced is not "superseded": it had ended.
        let out = transitions(Some(&r), &next, &rings(), later);
        assert_eq!(kinds(&out), ["rollout.started", "ring.started canary"]);
    }

    #[test]
    fn ids_are_stable_so_a_replayed_step_is_recorded_once() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let r = rollout(now);
        let a = transitions(None, &r, &rings(), now);
        let b = transitions(None, &r, &rings(), now + time::Duration::seconds(1));
        let ids = |v: &[Pending]| v.iter().map(|(_, id)| id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b));
        assert_ne!(ids(&a)[0], ids(&a)[1]);
    }
}
