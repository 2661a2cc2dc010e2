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
    /// The stream could not be set up or brought to the settings' limits.
    #[error("history stream: {0}")]
    Setup(String),
    /// An entry was not published (retried: entries are idempotent by id).
    #[error("history entry not published: {0}")]
    Publish(String),
    /// The stream could not be read now (NATS unreachable, a timeout).
    #[error("reading the history: {0}")]
    Read(String),
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
            .map_err(|e| HistoryError::Setup(e.to_string()))?;
        let info = existing
            .info()
            .await
            .map_err(|e| HistoryError::Setup(e.to_string()))?;
        // A retention changed in the settings applies to the stream made before.
        if info.config.max_age != config.max_age || info.config.max_bytes != config.max_bytes {
            let updated = stream::Config {
                max_age: config.max_age,
                max_bytes: config.max_bytes,
                ..info.config.clone()
            };
            js.update_stream(&updated)
                .await
                .map_err(|e| HistoryError::Setup(format!("applying its retention: {e}")))?;
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
            .map_err(|e| HistoryError::Publish(e.to_string()))
    }

    /// The newest entries the query matches, oldest first.
    pub async fn list(&self, query: &HistoryQuery) -> Result<Vec<HistoryEntry>, HistoryError> {
        let limit = query.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
        let read = HistoryError::Read;
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
            .map_err(|e| read(e.to_string()))?;
        let last = stream
            .info()
            .await
            .map_err(|e| read(e.to_string()))?
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
            .map_err(|e| read(e.to_string()))?;
        let mut out = std::collections::VecDeque::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(Vec::new());
        }
        let mut messages = consumer.messages().await.map_err(|e| read(e.to_string()))?;
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
            let msg = match next {
                Ok(Some(Ok(msg))) => msg,
                Ok(Some(Err(e))) => return Err(read(e.to_string())),
                Ok(None) => break,
                Err(_) => return Err(read("timed out".into())),
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
    fn decode<T: serde::de::DeserializeOwned>(
        headers: Option<&async_nats::HeaderMap>,
        payload: &[u8],
    ) -> Option<T> {
        fleetcast_runtime::consume::decode_payload(headers, payload).ok()
    }
    let mut e;
    if let Some(user) = names::subject_user(subject, names::RELEASE_PUBLISHED_PREFIX) {
        let p: ReleasePublished = decode(headers, payload)?;
        e = HistoryEntry::new(HistoryKind::ReleasePublished, at);
        // A name that is no app's (refused by the watcher) cannot stand in a subject.
        e.app = AppName::try_from(p.app).ok();
        e.version = Some(p.version);
        e.blake3 = Some(p.blake3);
        e.actor = Some(user.to_string());
    } else if let Some(user) = names::subject_user(subject, names::ROLLBACK_REQUESTED_PREFIX) {
        let r: RollbackRequested = decode(headers, payload)?;
        e = HistoryEntry::new(HistoryKind::RollbackRequested, at);
        e.reason = Some(format!("from {} back to {}", r.from, r.to));
        e.app = Some(r.app);
        e.version = Some(r.to);
        e.ring = r.ring;
        e.actor = Some(user.to_string());
    } else {
        match subject {
            names::PACKAGE_DETECTED => {
                let d: PackageDetected = decode(headers, payload)?;
                e = HistoryEntry::new(HistoryKind::PackageDetected, at);
                e.actor = Some(source_actor(&d.source));
                e.app = Some(d.app);
                e.version = Some(d.version);
                e.blake3 = Some(d.blake3);
            }
            names::PACKAGE_REJECTED => {
                let r: PackageRejected = decode(headers, payload)?;
                e = HistoryEntry::new(HistoryKind::PackageRejected, at);
                e.actor = Some(source_actor(&r.source));
                e.app = r.app;
                e.version = r.version;
                e.blake3 = r.blake3;
                e.code = Some(r.reason.code);
                e.reason = Some(r.reason.message);
            }
            names::RELEASE_SIGNED => {
                let s: ReleaseSigned = decode(headers, payload)?;
                e = HistoryEntry::new(HistoryKind::ReleaseSigned, at);
                e.actor = Some("signer".into());
                e.app = Some(s.app);
                e.version = Some(s.version);
                e.blake3 = Some(s.blake3);
            }
            names::RELEASE_REJECTED => {
                let r: ReleaseRejected = decode(headers, payload)?;
                e = HistoryEntry::new(HistoryKind::ReleaseRejected, at);
                e.actor = Some(r.stage);
                e.app = Some(r.app);
                e.version = Some(r.version);
                e.blake3 = r.blake3;
                e.code = Some(r.reason.code);
                e.reason = Some(r.reason.message);
            }
            names::RELEASE_STORED => {
                let s: ReleaseStored = decode(headers, payload)?;
                e = HistoryEntry::new(HistoryKind::ReleaseStored, at);
                e.actor = Some("distributor".into());
                e.reason = Some(format!(
                    "{} files, {} chunks ({} new, {} bytes added)",
                    s.files, s.chunks, s.new_chunks, s.new_stored_bytes
                ));
                e.app = Some(s.app);
                e.version = Some(s.version);
            }
            names::ROLLBACK_SIGNED => {
                let s: RollbackSigned = decode(headers, payload)?;
                e = HistoryEntry::new(HistoryKind::RollbackSigned, at);
                e.actor = Some("signer".into());
                e.reason = Some(format!("from {} back to {}", s.from, s.to));
                e.app = Some(s.app);
                e.version = Some(s.to);
                e.ring = s.ring;
            }
            names::EVENT_REJECTED => {
                let r: EventRejected = decode(headers, payload)?;
                e = HistoryEntry::new(HistoryKind::EventRejected, at);
                e.actor = Some(r.stage);
                e.code = Some(r.reason.code);
                e.reason = Some(format!("{}: {}", r.subject, r.reason.message));
            }
            _ => return None,
        }
    }
    Some((e, format!("pipeline:{seq}")))
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
    let mut out = Vec::new();
    let entry = |kind: HistoryKind, r: &Rollout, ring: Option<usize>| {
        let mut e = HistoryEntry::new(kind, now);
        e.app = Some(r.app.clone());
        e.version = Some(r.version.clone());
        e.actor = Some("tracker".into());
        e.ring = ring.and_then(|i| rings.get(i).cloned());
        let id = format!(
            "rollout:{}:{}:{}:{kind}:{}",
            r.app,
            r.version,
            r.created.unix_timestamp_nanos(),
            ring.map(|i| i.to_string()).unwrap_or_default()
        );
        (e, id)
    };
    let same = before.filter(|b| b.version == after.version && b.created == after.created);
    if same.is_none() {
        if let Some(old) = before.filter(|b| b.is_active()) {
            let (mut e, id) = entry(HistoryKind::RolloutSuperseded, old, None);
            e.reason = Some(format!("replaced by {}", after.version));
            out.push((e, id));
        }
        let (mut e, id) = entry(HistoryKind::RolloutStarted, after, None);
        e.reason = match (&after.directive, after.phase) {
            (Some(_), _) => Some("rollback".into()),
            (None, Phase::AwaitingApproval) => Some("waiting for approval".into()),
            _ => None,
        };
        out.push((e, id));
    }
    // Rings started: every ring up to the current one, once the rollout left approval (an
    // abort starts none; the rings it had started were recorded before).
    let started = |r: &Rollout| {
        (!matches!(r.phase, Phase::AwaitingApproval | Phase::Aborted)).then_some(r.ring)
    };
    // Rings completed: those before the current one, and the current one once its hosts are
    // done (its soak then runs) or the rollout completed.
    let completed = |r: &Rollout| {
        started(r)?;
        if r.phase == Phase::Completed || r.ring_completed.is_some() {
            Some(r.ring)
        } else {
            r.ring.checked_sub(1)
        }
    };
    let was_started = same.and_then(started);
    let was_completed = same.and_then(completed);
    if let Some(last) = started(after) {
        let now_completed = completed(after);
        for i in 0..=last {
            if was_started.is_none_or(|s| i > s) {
                out.push(entry(HistoryKind::RingStarted, after, Some(i)));
            }
            if now_completed.is_some_and(|c| i <= c) && was_completed.is_none_or(|c| i > c) {
                out.push(entry(HistoryKind::RingCompleted, after, Some(i)));
            }
        }
    }
    let phase_changed = same.is_none_or(|b| b.phase != after.phase);
    if phase_changed {
        let kind = match after.phase {
            Phase::Halted => Some(HistoryKind::RolloutHalted),
            Phase::Completed => Some(HistoryKind::RolloutCompleted),
            Phase::Aborted => Some(HistoryKind::RolloutAborted),
            Phase::AwaitingApproval | Phase::Running => None,
        };
        if let Some(kind) = kind {
            let (mut e, id) = entry(kind, after, Some(after.ring));
            e.reason.clone_from(&after.reason);
            out.push((e, id));
        }
    }
    out
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
        r.ring_completed = Some(now);
        assert_eq!(
            kinds(&transitions(Some(&before), &r, &rings(), now)),
            ["ring.completed canary"]
        );
        let mid = r.clone();
        // Chained: two rings at once (an empty ring with no soak).
        r.ring = 2;
        r.ring_completed = None;
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
        r.ring_completed = Some(now);
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
        r.phase = Phase::Halted;
        r.reason = Some("ring canary: 1 of 1 hosts failed".into());
        let out = transitions(Some(&before), &r, &rings(), now);
        assert_eq!(kinds(&out), ["rollout.halted canary"]);
        assert_eq!(out[0].0.reason, r.reason);

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
