//! How one app's loop learns its desired state and when it tries again: the desired-state
//! feed ([`DesiredFeed`]: announcements pushed on the key's subject, reads of the stored value,
//! each judged against the revisions seen) and the retry plan ([`Retry`]: what waits and when
//! it is applied again, decided from each update's outcome, without NATS or a clock).

use std::time::Duration;

use fleetcast_events::names::{self, desired_key, desired_subject};
use fleetcast_events::{AppName, RingName};
use fleetcast_runtime::agent_bus::AgentBus;
use semver::Version;
use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::updater::{Applied, UpdateError};

/// Reads in a row whose revision is older than one read before, ignored before it is believed.
const MAX_STALE_READS: u32 = 5;

/// The revisions of the desired state read so far. A read is served by any replica of the
/// bucket, and one that is behind answers with an older revision than a read before it: its
/// value is ignored (it would cancel a newer version waiting for its window, or be reported as
/// a replayed announcement) and the store read again soon. After [`MAX_STALE_READS`] such
/// reads in a row the older revision is believed: the bucket may have been made anew.
#[derive(Debug, Default)]
struct Reads {
    newest: u64,
    stale_in_a_row: u32,
}

impl Reads {
    /// Whether an announcement of `revision` is to be acted on: not when a read already
    /// brought a later one (the two can cross).
    fn pushed(&mut self, revision: u64) -> bool {
        if revision < self.newest {
            return false;
        }
        self.newest = revision;
        true
    }

    /// Whether a read of `revision` is to be acted on.
    fn fresh(&mut self, revision: u64) -> bool {
        if revision < self.newest && self.stale_in_a_row < MAX_STALE_READS {
            self.stale_in_a_row += 1;
            return false;
        }
        self.newest = revision;
        self.stale_in_a_row = 0;
        true
    }
}

/// One app's desired-state key, as this agent follows it. Announcements arrive on a plain
/// subscription to the subject the server republishes each write of the key on (with its
/// revision): the server fans one message out to every agent at once, where a KV watch would
/// cost a JetStream consumer per agent, each delivering on its own, and a plain subject crosses
/// leaf nodes. A subscription misses what is written while it is disconnected, hence the reads
/// of the stored value.
pub(crate) struct DesiredFeed {
    bus: AgentBus,
    app: AppName,
    subject: String,
    key: String,
    reads: Reads,
    /// A read failed or came from a replica behind since it was last asked: read again soon
    /// (the server just came back, a cluster is moving leaders; after a reconnect a read may
    /// be the only way to learn of an announcement).
    read_failed: bool,
}

impl DesiredFeed {
    pub(crate) fn new(bus: AgentBus, app: &AppName, ring: &RingName) -> Self {
        DesiredFeed {
            bus,
            app: app.clone(),
            subject: desired_subject(app, ring),
            key: desired_key(app, ring),
            reads: Reads::default(),
            read_failed: false,
        }
    }

    /// The subscription to the key's announcements, retried every second; `None`: shut down
    /// first.
    pub(crate) async fn subscribe(
        &self,
        shutdown: &CancellationToken,
    ) -> Option<async_nats::Subscriber> {
        loop {
            match self.bus.client.subscribe(self.subject.clone()).await {
                Ok(s) => return Some(s),
                Err(e) => {
                    tracing::warn!(app = %self.app, error = %e, "cannot subscribe to announcements, retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// The stored value; `None` when there is none (or it was deleted), or the read failed or
    /// came from a replica behind (then [`DesiredFeed::take_failed`] says so).
    pub(crate) async fn read(&mut self) -> Option<Vec<u8>> {
        match self.bus.desired.entry(&self.key).await {
            Ok(Some(entry)) => {
                if !self.reads.fresh(entry.revision) {
                    tracing::debug!(key = %self.key, revision = entry.revision, "read from a replica that is behind; reading again");
                    self.read_failed = true;
                    return None;
                }
                (entry.operation == async_nats::jetstream::kv::Operation::Put)
                    .then(|| entry.value.to_vec())
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(key = %self.key, error = %e, "desired state not read, retrying");
                self.read_failed = true;
                None
            }
        }
    }

    /// An announcement as received: its value, unless a read already brought a later
    /// revision (then the store is read again, to be sure) or it is a delete or purge of the
    /// key (which carries its operation in a header).
    pub(crate) fn announced(&mut self, message: &async_nats::Message) -> Option<Vec<u8>> {
        let headers = message.headers.as_ref();
        let revision = headers
            .and_then(|h| h.get(async_nats::header::NATS_SEQUENCE))
            .and_then(|v| v.as_str().parse::<u64>().ok());
        if !revision.is_none_or(|r| self.reads.pushed(r)) {
            self.read_failed = true;
            return None;
        }
        if headers.is_some_and(|h| h.get(names::KV_OPERATION_HEADER).is_some()) {
            return None;
        }
        Some(message.payload.to_vec())
    }

    /// Whether a read failed (or was behind) since this was last asked.
    pub(crate) fn take_failed(&mut self) -> bool {
        std::mem::take(&mut self.read_failed)
    }
}

/// What waits to be applied again and when: a desired state accepted but not finished yet
/// (its update window, a rollout slot, a transient failure), as received (a read of the store
/// now may come from a replica that has not caught up with it), and the instant of the next
/// attempt. After a transient failure: 1 s, doubling to a minute; a fresh schedule after a
/// success or when the tracker asks for a retry.
pub(crate) struct Retry {
    delays: Box<dyn Iterator<Item = Duration> + Send>,
    pending: Option<(Version, Vec<u8>)>,
    at: Option<Instant>,
}

fn fresh_delays() -> Box<dyn Iterator<Item = Duration> + Send> {
    Box::new(fleetcast_runtime::retry::delays(
        Duration::from_secs(1),
        Duration::from_secs(60),
    ))
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            delays: fresh_delays(),
            pending: None,
            at: None,
        }
    }
}

impl Retry {
    /// When the next attempt is due, if one is.
    pub(crate) fn at(&self) -> Option<Instant> {
        self.at
    }

    /// A read failed: try again within a second (or sooner, when due sooner).
    pub(crate) fn soon(&mut self, now: Instant) {
        let soon = now + Duration::from_secs(1);
        self.at = Some(self.at.map_or(soon, |at| at.min(soon)));
    }

    /// The attempt is made now (it is due, or the tracker asked for it: `asked`, which starts
    /// the backoff anew): the desired state that waits, or `None` to read the store.
    pub(crate) fn take(&mut self, asked: bool) -> Option<Vec<u8>> {
        self.at = None;
        if asked {
            self.delays = fresh_delays();
        }
        self.pending.as_ref().map(|(_, bytes)| bytes.clone())
    }

    /// What applying `version` (received as `bytes`) came to: when the next attempt is, if
    /// one is scheduled now.
    pub(crate) fn applied(
        &mut self,
        version: &Version,
        bytes: &[u8],
        outcome: &Result<Applied, UpdateError>,
        now: Instant,
        now_utc: OffsetDateTime,
    ) -> Option<Duration> {
        let wait = match outcome {
            Ok(_) => {
                self.delays = fresh_delays();
                self.pending = None;
                return None;
            }
            // An older state read from a lagging replica does not cancel a newer one still
            // waiting.
            Err(UpdateError::Refused(_)) => {
                if self.pending.as_ref().is_some_and(|(v, _)| v == version) {
                    self.pending = None;
                }
                return None;
            }
            Err(UpdateError::NotNow(opens)) => {
                Duration::try_from((*opens - now_utc).max(time::Duration::ZERO)).unwrap_or_default()
            }
            Err(UpdateError::Transient(_)) => self.delays.next().unwrap_or_default(),
        };
        self.pending = Some((version.clone(), bytes.to_vec()));
        self.at = Some(now + wait);
        Some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_behind_an_earlier_read_are_ignored_a_few_times_then_believed() {
        let mut reads = Reads::default();
        assert!(reads.fresh(7));
        assert!(
            reads.fresh(7),
            "the same revision again is acted on (idempotent)"
        );
        assert!(reads.fresh(9));
        // A replica behind: ignored, and again after a newer read.
        assert!(!reads.fresh(8));
        assert!(reads.fresh(10));
        for _ in 0..MAX_STALE_READS {
            assert!(!reads.fresh(2));
        }
        // Still 2 after that many reads: the bucket was made anew; from now on it is the base.
        assert!(reads.fresh(2));
        assert!(reads.fresh(3));
        assert!(!reads.fresh(2));
        // Announcements: one older than a read is dropped; a newer one moves the base on.
        assert!(!reads.pushed(1));
        assert!(reads.pushed(4));
        assert!(!reads.fresh(3));
    }

    fn v(s: &str) -> Version {
        Version::parse(s).expect("version")
    }

    fn transient() -> Result<Applied, UpdateError> {
        Err(UpdateError::Transient("store down".into()))
    }

    #[test]
    fn a_transient_failure_is_retried_later_each_time_until_a_success() {
        let (now, utc) = (Instant::now(), OffsetDateTime::now_utc());
        let mut retry = Retry::default();
        // In whole milliseconds: the schedule is computed in f32.
        let ms = |wait: Option<Duration>| wait.map(|w| w.as_millis());
        let waits: Vec<Option<u128>> = (0..4)
            .map(|_| ms(retry.applied(&v("2.0.0"), b"two", &transient(), now, utc)))
            .collect();
        assert_eq!(waits, [Some(1_000), Some(2_000), Some(4_000), Some(8_000)]);
        assert_eq!(ms(retry.at().map(|at| at - now)), Some(8_000));
        // When it is due, the state as received is applied again, not a read of the store.
        assert_eq!(retry.take(false), Some(b"two".to_vec()));
        assert_eq!(retry.at(), None);
        assert_eq!(
            retry.applied(&v("2.0.0"), b"two", &Ok(Applied::Updated), now, utc),
            None
        );
        assert_eq!(retry.take(false), None, "nothing waits: read the store");
        assert_eq!(
            ms(retry.applied(&v("3.0.0"), b"three", &transient(), now, utc)),
            Some(1_000),
            "a fresh schedule after a success"
        );
    }

    #[test]
    fn the_trackers_retry_starts_the_schedule_anew() {
        let (now, utc) = (Instant::now(), OffsetDateTime::now_utc());
        let mut retry = Retry::default();
        for _ in 0..3 {
            retry.applied(&v("2.0.0"), b"two", &transient(), now, utc);
        }
        assert_eq!(retry.take(true), Some(b"two".to_vec()));
        let wait = retry.applied(&v("2.0.0"), b"two", &transient(), now, utc);
        assert_eq!(wait.map(|w| w.as_millis()), Some(1_000));
    }

    #[test]
    fn a_closed_window_waits_until_it_opens_and_a_refusal_of_another_version_keeps_it() {
        let (now, utc) = (Instant::now(), OffsetDateTime::now_utc());
        let mut retry = Retry::default();
        let opens = Err(UpdateError::NotNow(utc + time::Duration::minutes(5)));
        assert_eq!(
            retry.applied(&v("2.0.0"), b"two", &opens, now, utc),
            Some(Duration::from_secs(300))
        );
        // An older state from a lagging replica, refused: 2.0.0 still waits.
        let refused = Err(UpdateError::Refused("older than 2.0.0".into()));
        assert_eq!(retry.applied(&v("1.0.0"), b"one", &refused, now, utc), None);
        assert_eq!(retry.at(), Some(now + Duration::from_secs(300)));
        assert_eq!(retry.take(false), Some(b"two".to_vec()));
        // Refused itself (its window's version withdrawn): nothing waits any more.
        retry.applied(&v("2.0.0"), b"two", &refused, now, utc);
        assert_eq!(retry.take(false), None);
        // A window that opened already: at once.
        let opened = Err(UpdateError::NotNow(utc - time::Duration::minutes(1)));
        assert_eq!(
            retry.applied(&v("2.0.0"), b"two", &opened, now, utc),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn a_failed_read_is_made_again_within_a_second() {
        let now = Instant::now();
        let mut retry = Retry::default();
        retry.soon(now);
        assert_eq!(retry.at(), Some(now + Duration::from_secs(1)));
        retry.soon(now + Duration::from_millis(500));
        assert_eq!(retry.at(), Some(now + Duration::from_secs(1)), "not later");
    }
}
