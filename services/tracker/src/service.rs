//! The tracker service around the pure parts: folds agents' reports into the inventory, starts
//! a rollout for each stored release, answers slot requests and operators' commands, moves the
//! rollouts on every tick, writes the desired states they call for, and saves everything to
//! JetStream KV so a restart continues where it was.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{kv, stream};
use fleetcast_events::names::{
    self, FLEET_BUCKET, ROLLOUTS_BUCKET, ReportKind, ReportSubject, SLOT_REQUESTS, SlotSubject,
    TRACKER_REQUESTS, release_key,
};
use fleetcast_events::v1::{
    AgentHeartbeat, AgentStatus, HistoryEntry, HistoryKind, PatchesWanted, ReleaseStored,
    RollbackSigned, SlotReply, SlotRequest,
};
use fleetcast_events::{AgentId, AppName, Encoding, RingName};
use fleetcast_runtime::bus::Role;
use fleetcast_runtime::consume::{
    ConsumerSpec, Outcome, PULL_EXPIRES, decode_or_reject, run_consumer,
};
use fleetcast_runtime::metrics::CounterFamily;
use fleetcast_runtime::{Bus, BusError, Desired, Records};
use futures::StreamExt;
use time::OffsetDateTime;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::TrackerError;
use crate::fleet::{AgentView, Fleet};
use crate::history::{self, History, Pending};
use crate::laggards::Laggard;
use crate::releases;
use crate::rollout::{Effect, Rollout};
use crate::settings::Settings;
use crate::timeline::{self, Sample};
use fleetcast_events::tracker::AppReleases;
use fleetcast_events::tracker::{
    AgentSummary, Command, HistoryQuery, Reply, RolloutSummary, TimelineView,
};

/// Binary patches are asked for from at most this many versions the fleet runs.
const PATCH_BASES: usize = 3;

const SERVICE: &str = "tracker";

/// How long the report stream may stay quiet before it is polled again (see `follow_reports`).
const IDLE_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// The key holding the status-stream position the saved inventory reflects (agent ids have no
/// dots, so it cannot collide with one).
const CURSOR_KEY: &str = "cursor.status";

/// What the tracker uses of the bus: the release events (stored releases and rollback
/// directives in, patch requests and rollback requests out), the agents' reports, the release
/// records, the desired states it writes, its inventory and rollouts.
#[derive(Clone)]
pub struct TrackerBus {
    pub bus: Bus,
    pub releases_stream: stream::Stream,
    pub status_stream: stream::Stream,
    pub records: Records,
    pub desired: Desired,
    pub fleet: kv::Store,
    pub rollouts: kv::Store,
}

fleetcast_runtime::bus_role!(TrackerBus);

impl Role for TrackerBus {
    async fn bind(bus: &Bus) -> Result<Self, BusError> {
        Ok(TrackerBus {
            releases_stream: bus.stream(names::RELEASES_STREAM).await?,
            status_stream: bus.stream(names::STATUS_STREAM).await?,
            records: Records::bind(bus).await?,
            desired: Desired::bind(bus).await?,
            fleet: bus.bucket(names::FLEET_BUCKET).await?,
            rollouts: bus.bucket(names::ROLLOUTS_BUCKET).await?,
            bus: bus.clone(),
        })
    }
}

pub struct Tracker {
    pub bus: TrackerBus,
    /// The connection replies are sent from: one whose credential may publish to inboxes
    /// (`_INBOX.>`) and nothing else (`reply_credentials`), so that no reply subject a
    /// requester names can make the tracker write a store or an event.
    replies: async_nats::Client,
    pub settings: Arc<Settings>,
    /// Reports and requests refused (forged identity, wrong reply subject, …).
    refused: CounterFamily<2>,
    /// Attempts to deliver history entries to each webhook, by outcome.
    pub webhook_deliveries: CounterFamily<2>,
    /// The two counters above and the tracker's identity; its view of the fleet is added at
    /// each scrape ([`crate::metrics::render`]).
    registry: prometheus_client::registry::Registry,
    pub history: History,
    state: Mutex<State>,
    /// An agent reported on a rollout: move it on now rather than at the next tick, so a ring
    /// completes (or halts) when its last report arrives.
    reported: tokio::sync::Notify,
}

/// After a report wakes the rollouts, how long others may gather before they are moved on
/// (a thousand agents reporting within a second cost a few passes, not a thousand).
const REPORTS_GATHER: std::time::Duration = std::time::Duration::from_millis(20);

/// How often the agents' records are saved at most: they are only read at a restart, and the
/// status stream's cursor saved with them makes the replay exact, so saving them on every pass
/// (one every few tens of milliseconds while a fleet reports) would only cost writes.
const AGENTS_SAVE_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// The save waits until no status report came for this long: a ring's agents all react to its
/// announcement within milliseconds, and hundreds of records written in the middle of that
/// burst compete with it for the server (measured: 8–10 ms more before the last of 1,000
/// agents reacted, on 2 cores).
const AGENTS_SAVE_QUIET: std::time::Duration = std::time::Duration::from_millis(500);

/// …but no longer than this after the last save, however busy the fleet: what a restart
/// replays stays short.
const AGENTS_SAVE_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether this pass saves the agents' records, given how long ago they were last saved and
/// the last status report came (`None`: never).
fn agents_save_due(
    since_save: Option<std::time::Duration>,
    since_status: Option<std::time::Duration>,
) -> bool {
    let Some(since_save) = since_save else {
        return true;
    };
    since_save >= AGENTS_SAVE_PERIOD
        && (since_status.is_none_or(|s| s >= AGENTS_SAVE_QUIET) || since_save >= AGENTS_SAVE_MAX)
}

#[derive(Default)]
struct State {
    fleet: Fleet,
    /// Per app: its current (or last) rollout.
    rollouts: BTreeMap<AppName, Rollout>,
    dirty_agents: BTreeSet<AgentId>,
    dirty_rollouts: BTreeSet<AppName>,
    /// Last status-stream sequence folded into `fleet`.
    cursor: u64,
    /// When the agents were last saved.
    agents_saved: Option<tokio::time::Instant>,
    /// When the last status report (not heartbeat) was folded.
    last_status: Option<tokio::time::Instant>,
    /// Rings whose desired state a rollout called for but could not be written yet (NATS
    /// failing, a cluster moving leaders), as (app, version, ring). Written again on every pass
    /// while that rollout is still the app's and has not halted or been aborted; the rollout
    /// has moved on and will not ask again.
    unwritten: BTreeSet<(AppName, semver::Version, RingName)>,
    /// How long the last report took from the stream to here (seconds).
    report_lag_s: f64,
    /// History entries made under the lock, recorded after it (`Tracker::flush_history`);
    /// kept for the next pass while the history cannot be written.
    history: Vec<Pending>,
    /// Hosts the replacement hook was called for (or, in dry run, would have been) while they
    /// still lag; and the calls running.
    replace_called: BTreeSet<AgentId>,
    replace_running: usize,
    /// Remedies sent to stuck hosts, by agent, app and version, while they still lag.
    remedied: BTreeMap<(AgentId, AppName, semver::Version), crate::laggards::Remedied>,
}

impl State {
    /// Folds an agent's heartbeat (received at `seen`). A status lost on the way (the agent's
    /// connection dropped as it published) would leave its rollout waiting for ever: the
    /// outcome every heartbeat repeats counts as that status (once). Whether a rollout moved.
    fn fold_heartbeat(
        &mut self,
        hb: AgentHeartbeat,
        seen: OffsetDateTime,
        now: OffsetDateTime,
    ) -> bool {
        self.fleet.heartbeat(&hb, seen);
        let mut moved = false;
        for app in &hb.apps {
            if let (Some(update), Some(rollout)) =
                (&app.last_update, self.rollouts.get_mut(&app.app))
                && rollout.record_outcome(&hb.agent_id, update)
            {
                if let Some(reason) = rollout.failures.get(&hb.agent_id)
                    && update.outcome.state().is_failure()
                {
                    let entry = history::host_failed(rollout, &hb.agent_id, reason, now);
                    self.history.push(entry);
                }
                self.dirty_rollouts.insert(app.app.clone());
                moved = true;
            }
        }
        self.dirty_agents.insert(hb.agent_id);
        moved
    }

    /// Folds an agent's status of one app (the agent in `ring`, received at `seen`). Whether
    /// it concerns a rollout (which then moves on at once).
    fn fold_status(
        &mut self,
        st: &AgentStatus,
        ring: &RingName,
        seen: OffsetDateTime,
        now: OffsetDateTime,
    ) -> bool {
        self.fleet.status(st, ring, seen);
        self.dirty_agents.insert(st.agent_id.clone());
        let Some(rollout) = self.rollouts.get_mut(&st.app) else {
            return false;
        };
        if rollout.record_status(st)
            && st.state.is_failure()
            && let Some(reason) = rollout.failures.get(&st.agent_id)
        {
            let entry = history::host_failed(rollout, &st.agent_id, reason, now);
            self.history.push(entry);
        }
        self.dirty_rollouts.insert(st.app.clone());
        true
    }
}

/// How many of a version's newest history entries are read for a timeline's marks (rings,
/// halts; its hosts' rollbacks and operators' actions are among them).
const MARKS_READ: usize = 2_000;

/// How many unrecorded history entries are kept while the history cannot be written (NATS
/// unreachable); beyond, the oldest are dropped, with a warning.
const HISTORY_BACKLOG: usize = 10_000;

impl Tracker {
    /// Loads the saved inventory and rollouts. Replies go out on `replies` (see
    /// [`Tracker::replies`]).
    pub async fn load(
        bus: TrackerBus,
        replies: async_nats::Client,
        settings: Arc<Settings>,
    ) -> Result<Arc<Tracker>, TrackerError> {
        let mut state = State::default();
        let mut keys = (bus.fleet.keys().await)
            .map_err(|e| TrackerError::store(FLEET_BUCKET, "(listing)", e))?;
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| TrackerError::store(FLEET_BUCKET, "(listing)", e))?;
            let got = bus.fleet.get(&key).await;
            let Some(bytes) = got.map_err(|e| TrackerError::store(FLEET_BUCKET, &key, e))? else {
                continue;
            };
            if key == CURSOR_KEY {
                state.cursor = String::from_utf8_lossy(&bytes).trim().parse().unwrap_or(0);
            } else {
                match serde_json::from_slice::<AgentView>(&bytes) {
                    Ok(agent) => {
                        state.fleet.agents.insert(agent.agent_id.clone(), agent);
                    }
                    Err(e) => tracing::warn!(%key, error = %e, "unreadable agent record skipped"),
                }
            }
        }
        let mut keys = (bus.rollouts.keys().await)
            .map_err(|e| TrackerError::store(ROLLOUTS_BUCKET, "(listing)", e))?;
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| TrackerError::store(ROLLOUTS_BUCKET, "(listing)", e))?;
            let got = bus.rollouts.get(&key).await;
            if let Some(bytes) = got.map_err(|e| TrackerError::store(ROLLOUTS_BUCKET, &key, e))? {
                match serde_json::from_slice::<Rollout>(&bytes) {
                    Ok(r) => {
                        state.rollouts.insert(r.app.clone(), r);
                    }
                    Err(e) => tracing::warn!(%key, error = %e, "unreadable rollout skipped"),
                }
            }
        }
        // A tracker that stopped between moving a rollout to its next ring and writing that
        // ring's desired state would otherwise never write it: the write is made again (the
        // same state again is a no-op for agents).
        for rollout in state.rollouts.values() {
            if rollout.phase.is_stopped() {
                continue;
            }
            if let Some(ring) = settings.policy_for(rollout).rings.get(rollout.ring) {
                state.unwritten.insert((
                    rollout.app.clone(),
                    rollout.version.clone(),
                    ring.name.clone(),
                ));
            }
        }
        tracing::info!(
            agents = state.fleet.agents.len(),
            rollouts = state.rollouts.len(),
            cursor = state.cursor,
            "state loaded"
        );
        let history = History::open(&bus, &bus.releases_stream, &settings.history).await?;
        let mut registry = crate::metrics::registry(&bus.client);
        let refused = refused_counter(&mut registry);
        let webhook_deliveries =
            crate::webhook::deliveries_counter(&mut registry, &settings.webhooks);
        Ok(Arc::new(Tracker {
            bus,
            replies,
            settings,
            refused,
            webhook_deliveries,
            registry,
            history,
            state: Mutex::new(state),
            reported: tokio::sync::Notify::new(),
        }))
    }

    /// Folds every agent report from the status stream, from where the saved state left off.
    /// The consumer is ordered: one replica, on the stream's leader. When that server dies the
    /// client makes a new one after two missed idle heartbeats, each half a pull's expiry
    /// ([`PULL_EXPIRES`]); with the client's default (30 s) the tracker went deaf, and
    /// rollouts stood still, for half a minute.
    pub async fn follow_reports(self: Arc<Self>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let start = self.state.lock().await.cursor + 1;
            let consumer = self
                .bus
                .status_stream
                .create_consumer(pull::OrderedConfig {
                    filter_subject: "fleetcast.v1.agent.>".into(),
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: start,
                    },
                    max_expires: PULL_EXPIRES,
                    ..Default::default()
                })
                .await;
            let mut messages = match consumer {
                Ok(c) => match c.messages().await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read agent reports, retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot follow agent reports, retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            };
            // The client counts two missed idle heartbeats before it replaces the consumer, but
            // after the first it re-arms its heartbeat timer only when the stream is polled
            // again, and nothing may wake it (async-nats 0.51): after the status stream's
            // leader died the tracker then heard nothing for 45 s, until a request of the
            // client's own timed out. Polled again after each quiet second, the second miss is
            // counted (and a burst of reports is not interrupted).
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    next = tokio::time::timeout(IDLE_POLL, messages.next()) => next,
                };
                // A quiet second: poll again.
                let Ok(next) = next else { continue };
                match next {
                    Some(Ok(msg)) => self.fold_report(&msg).await,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "report stream hiccup");
                    }
                    None => break,
                }
            }
        }
    }

    /// Folds one agent report into the inventory and the rollouts, unless its body disagrees
    /// with its subject (or does not decode): then it is counted as refused and ignored.
    async fn fold_report(&self, msg: &async_nats::jetstream::Message) {
        let Ok((seq, published)) = msg.info().map(|i| (i.stream_sequence, i.published)) else {
            return;
        };
        let now = OffsetDateTime::now_utc();
        // When the agent was last heard of is when the stream took its report: a report
        // replayed after a restart (up to AGENTS_SAVE_MAX old) does not make an agent that has
        // gone silent since look alive. Never later than now (clocks differ a little).
        let seen = published.min(now);
        let mut state = self.state.lock().await;
        state.cursor = state.cursor.max(seq);
        state.report_lag_s = (now - published).as_seconds_f64().max(0.0);
        // Who sent it is what its subject says, which only that agent's credential may publish
        // on; never what the body says.
        let Some(from) = names::parse_report_subject(&msg.subject) else {
            self.refused.inc(&["report", "subject"]);
            tracing::warn!(subject = %msg.subject, "report on a subject that names no agent; ignored");
            return;
        };
        let moved = match &from.kind {
            ReportKind::Heartbeat => {
                let Some(hb) = self.accept("heartbeat", msg, |hb| check_heartbeat(&from, hb))
                else {
                    return;
                };
                state.fold_heartbeat(hb, seen, now)
            }
            ReportKind::Status { app } => {
                let Some(st) = self.accept("status", msg, |st| check_status(&from, app, st)) else {
                    return;
                };
                state.last_status = Some(tokio::time::Instant::now());
                state.fold_status(&st, &from.ring, seen, now)
            }
        };
        if moved {
            self.reported.notify_one();
        }
    }

    /// The report `msg` carries (`what`: `heartbeat` or `status`) if it decodes and `check`
    /// finds it is its subject's; else `None`, counted and logged as refused.
    fn accept<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        msg: &async_nats::jetstream::Message,
        check: impl FnOnce(&T) -> Result<(), IdentityMismatch>,
    ) -> Option<T> {
        let report = match fleetcast_runtime::consume::decode::<T>(msg) {
            Ok(report) => report,
            Err(e) => {
                self.refused.inc(&[what, "decode"]);
                tracing::warn!(subject = %msg.subject, error = %e, "{what} does not decode; ignored");
                return None;
            }
        };
        if let Err(why) = check(&report) {
            self.refused.inc(&[what, "identity"]);
            tracing::warn!(subject = %msg.subject, %why, "{what} refused");
            return None;
        }
        Some(report)
    }

    /// Starts a rollout for every stored release newer than the app's current one.
    pub async fn follow_releases(
        self: Arc<Self>,
        shutdown: CancellationToken,
    ) -> Result<(), TrackerError> {
        self.follow(
            names::TRACKER_CONSUMER,
            names::RELEASE_STORED,
            shutdown,
            |me, stored: ReleaseStored| async move { me.start_rollout(&stored).await },
        )
        .await
    }

    /// Starts a rollback rollout for every rollback directive the signer issues.
    pub async fn follow_rollbacks(
        self: Arc<Self>,
        shutdown: CancellationToken,
    ) -> Result<(), TrackerError> {
        self.follow(
            names::TRACKER_ROLLBACK_CONSUMER,
            names::ROLLBACK_SIGNED,
            shutdown,
            |me, signed: RollbackSigned| async move { me.start_rollback(signed).await },
        )
        .await
    }

    /// Records every pipeline event (published, detected, signed, stored, rejected, rollback
    /// asked and signed) in the history, as it happened and by whom.
    pub async fn follow_pipeline(
        self: Arc<Self>,
        shutdown: CancellationToken,
    ) -> Result<(), TrackerError> {
        let spec = ConsumerSpec {
            durable: names::TRACKER_HISTORY_CONSUMER,
            // Every subject of the stream.
            filter_subject: "",
            ack_wait: std::time::Duration::from_secs(30),
        };
        let me = self.clone();
        run_consumer(&self.bus.releases_stream, spec, shutdown, move |msg| {
            let me = me.clone();
            async move {
                let Ok((at, seq)) = msg.info().map(|i| (i.published, i.stream_sequence)) else {
                    return Outcome::Done;
                };
                let Some((entry, id)) = history::from_pipeline(
                    &msg.subject,
                    &msg.payload,
                    msg.headers.as_ref(),
                    at,
                    seq,
                ) else {
                    return Outcome::Done;
                };
                match me.history.record(&entry, &id).await {
                    Ok(()) => Outcome::Done,
                    Err(e) => retry_unless_permanent(&e),
                }
            }
        })
        .await
        .map_err(|e| TrackerError::follow("the release stream", e))
    }

    /// Follows one event subject of the releases stream with a durable consumer: each event
    /// decoded (or refused as malformed) and handed to `handle`.
    async fn follow<E, F, Fut>(
        self: Arc<Self>,
        durable: &'static str,
        subject: &'static str,
        shutdown: CancellationToken,
        handle: F,
    ) -> Result<(), TrackerError>
    where
        E: serde::de::DeserializeOwned,
        F: Fn(Arc<Tracker>, E) -> Fut + Copy,
        Fut: std::future::Future<Output = Outcome>,
    {
        let spec = ConsumerSpec {
            durable,
            filter_subject: subject,
            ack_wait: std::time::Duration::from_secs(30),
        };
        let me = self.clone();
        run_consumer(&self.bus.releases_stream, spec, shutdown, move |msg| {
            let me = me.clone();
            async move {
                match decode_or_reject(&me.bus, SERVICE, &msg).await {
                    Ok(event) => handle(me, event).await,
                    Err(outcome) => outcome,
                }
            }
        })
        .await
        .map_err(|e| TrackerError::follow("the release stream", e))
    }

    #[tracing::instrument(skip_all, fields(app = %signed.app, version = %signed.to))]
    async fn start_rollback(&self, signed: RollbackSigned) -> Outcome {
        let now = OffsetDateTime::now_utc();
        let (rollout, effects) = {
            let mut state = self.state.lock().await;
            // The same directive for the same scope: a redelivery. (Two requests within one
            // second sign identical directives; a different ring is a different rollback.)
            let redelivered = state.rollouts.get(&signed.app).is_some_and(|r| {
                r.version == signed.to
                    && r.directive.as_ref() == Some(&signed.manifest)
                    && r.only_ring == signed.ring
            });
            if !redelivered {
                let mut probe =
                    Rollout::start(&signed.app, signed.to.clone(), &Default::default(), now).0;
                probe.only_ring.clone_from(&signed.ring);
                let policy = self.settings.policy_for(&probe);
                let (mut rollout, _) = Rollout::start_rollback(
                    &signed.app,
                    signed.to.clone(),
                    signed.manifest.clone(),
                    signed.ring.clone(),
                    &policy,
                    now,
                );
                let previous = state.rollouts.get(&signed.app);
                rollout.replacing(previous);
                tracing::warn!(from = %signed.from, ring = ?signed.ring, "rollback started");
                let entries = history::transitions(previous, &rollout, &ring_names(&policy), now);
                state.history.extend(entries);
                state.rollouts.insert(signed.app.clone(), rollout);
                state.dirty_rollouts.insert(signed.app.clone());
            }
            let Some(rollout) = state.rollouts.get(&signed.app).cloned() else {
                return Outcome::Done;
            };
            let ring = self
                .settings
                .policy_for(&rollout)
                .rings
                .get(rollout.ring)
                .map(|r| r.name.clone());
            let effects: Vec<Effect> = ring
                .filter(|_| rollout.is_active())
                .map(|ring| Effect::Desire { ring })
                .into_iter()
                .collect();
            (rollout, effects)
        };
        self.flush_history().await;
        match self
            .apply(
                &rollout.app,
                &rollout.version,
                rollout.directive.as_ref(),
                effects,
            )
            .await
        {
            Ok(()) => Outcome::Done,
            Err(e) => retry_unless_permanent(&e),
        }
    }

    #[tracing::instrument(skip_all, fields(app = %stored.app, version = %stored.version))]
    async fn start_rollout(&self, stored: &ReleaseStored) -> Outcome {
        let policy = self.settings.policy(&stored.app);
        let now = OffsetDateTime::now_utc();
        let effects = {
            let mut state = self.state.lock().await;
            match state.rollouts.get(&stored.app) {
                // A redelivery (its effects may not have been carried out): the current ring's
                // desired state again, which is idempotent.
                Some(r) if r.version == stored.version => {
                    let ring = policy.rings.get(r.ring).map(|ring| ring.name.clone());
                    match ring {
                        Some(ring) if r.is_active() => vec![Effect::Desire { ring }],
                        _ => return Outcome::Done,
                    }
                }
                // An older release stored late: nothing to start; whoever waits for it learns
                // that it was superseded.
                Some(r) if r.version > stored.version => {
                    if let Some(r) = state.rollouts.get_mut(&stored.app) {
                        r.mark_superseded(stored.version.clone());
                    }
                    state.dirty_rollouts.insert(stored.app.clone());
                    return Outcome::Done;
                }
                previous => {
                    let (mut rollout, effects) =
                        Rollout::start(&stored.app, stored.version.clone(), &policy, now);
                    rollout.replacing(previous);
                    tracing::info!(phase = ?rollout.phase.kind(), "rollout started");
                    let entries =
                        history::transitions(previous, &rollout, &ring_names(&policy), now);
                    state.history.extend(entries);
                    state.rollouts.insert(stored.app.clone(), rollout);
                    state.dirty_rollouts.insert(stored.app.clone());
                    effects
                }
            }
        };
        self.flush_history().await;
        if let Err(e) = self
            .apply(&stored.app, &stored.version, None, effects)
            .await
        {
            return retry_unless_permanent(&e);
        }
        self.want_patches(stored).await;
        Outcome::Done
    }

    /// Asks the distributor for binary patches of a new release from the versions the fleet
    /// runs (in the span of the rollout it starts). Best effort: a release rolls out without
    /// patches (its hosts fetch chunks).
    async fn want_patches(&self, stored: &ReleaseStored) {
        let bases = self.state.lock().await.fleet.running_versions(
            &stored.app,
            &stored.version,
            PATCH_BASES,
        );
        if bases.is_empty() {
            return;
        }
        let wanted = PatchesWanted {
            app: stored.app.clone(),
            version: stored.version.clone(),
            bases,
        };
        let id = format!("patches.{}", release_key(&stored.app, &stored.version));
        if let Err(e) = self
            .bus
            .publish_event(names::PATCHES_WANTED, &wanted, Encoding::Json, Some(&id))
            .await
        {
            tracing::warn!(error = %e, "patches not asked for; hosts will fetch chunks");
        }
    }

    /// Carries out a rollout's effects (in the span of the rollout: its callers say which). A
    /// ring's desired state that cannot be written is kept to be written again (see
    /// `State::unwritten`); the first such error is returned.
    async fn apply(
        &self,
        app: &AppName,
        version: &semver::Version,
        directive: Option<&fleetcast_events::SignedManifest>,
        effects: Vec<Effect>,
    ) -> Result<(), fleetcast_runtime::releases::RecordError> {
        let mut failed = Ok(());
        for effect in effects {
            match effect {
                Effect::Desire { ring } => {
                    if let Err(e) = self.write_desired(app, version, directive, &ring).await {
                        let key = (app.clone(), version.clone(), ring);
                        self.state.lock().await.unwritten.insert(key);
                        failed = failed.and(Err(e));
                    }
                }
                Effect::Halted { reason } => tracing::warn!(%reason, "rollout halted"),
                Effect::Completed => tracing::info!("rollout completed"),
            }
        }
        failed
    }

    /// Writes `ring`'s desired state: `version`, or the rollback `directive` (in the span of
    /// the rollout).
    #[tracing::instrument(skip_all, fields(%ring))]
    async fn write_desired(
        &self,
        app: &AppName,
        version: &semver::Version,
        directive: Option<&fleetcast_events::SignedManifest>,
        ring: &RingName,
    ) -> Result<(), fleetcast_runtime::releases::RecordError> {
        match directive {
            Some(manifest) => {
                self.bus
                    .desired
                    .desire_with(app, ring, version, manifest.clone(), true)
                    .await?
            }
            None => {
                let records = &self.bus.records;
                self.bus
                    .desired
                    .desire(records, app, ring, version, true)
                    .await?
            }
        }
        tracing::info!("ring started: desired state written");
        Ok(())
    }

    /// Every tick: move rollouts on, prune the inventory, save what changed.
    pub async fn run_ticks(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.settings.tick);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
                _ = self.reported.notified() => tokio::time::sleep(REPORTS_GATHER).await,
            }
            let now = OffsetDateTime::now_utc();
            let mut todo = Vec::new();
            {
                let mut state = self.state.lock().await;
                let state = &mut *state;
                for (app, rollout) in state.rollouts.iter_mut() {
                    let before = rollout.clone();
                    let policy = self.settings.policy_for(rollout);
                    let effects = rollout.tick(&policy, &state.fleet, now, self.settings.timing());
                    // The timeline while it runs, and once more as it ends (halted, completed).
                    if before.is_active() || rollout.is_active() {
                        let rings =
                            rollout.progress(&policy, &state.fleet, now, self.settings.timing());
                        timeline::record(&mut rollout.timeline, Sample::of(&rings, now));
                    }
                    if *rollout != before {
                        state.dirty_rollouts.insert(app.clone());
                        let entries =
                            history::transitions(Some(&before), rollout, &ring_names(&policy), now);
                        state.history.extend(entries);
                    }
                    if !effects.is_empty() {
                        todo.push((
                            app.clone(),
                            rollout.version.clone(),
                            rollout.directive.clone(),
                            effects,
                        ));
                    }
                }
                for gone in state.fleet.prune(now, self.settings.prune_after) {
                    tracing::info!(agent = %gone, "silent agent pruned");
                    state.dirty_agents.insert(gone);
                }
            }
            self.replace_laggards(now).await;
            self.remedy_laggards(now).await;
            self.write_unwritten().await;
            self.flush_history().await;
            for (app, version, directive, effects) in todo {
                let span = tracing::info_span!("rollout", %app, %version);
                async {
                    let applied = self.apply(&app, &version, directive.as_ref(), effects);
                    if let Err(e) = applied.await {
                        tracing::warn!(error = %e, "rollout effect failed; retried next tick");
                    }
                }
                .instrument(span)
                .await;
            }
            if let Err(e) = self.save(false).await {
                tracing::warn!(error = %e, "state not saved; retried next tick");
            }
        }
        let _ = self.save(true).await;
    }

    /// Calls the replacement hook for the laggards [`crate::laggards::to_replace`] picks, each
    /// on a task of its own; the calls and their outcomes go to the history.
    async fn replace_laggards(self: &Arc<Self>, now: OffsetDateTime) {
        let replace = &self.settings.replace;
        if replace.command.is_empty() {
            return;
        }
        let mut state = self.state.lock().await;
        let state = &mut *state;
        let all: Vec<Laggard> = self.laggards_of(state, None, now).collect();
        // A host that caught up may be replaced if it lags again later.
        state
            .replace_called
            .retain(|id| all.iter().any(|l| l.agent_id == *id));
        let plan: Vec<Laggard> = crate::laggards::to_replace(
            &all,
            &state.fleet,
            now,
            self.settings.timing(),
            replace,
            &state.replace_called,
            state.replace_running,
        )
        .into_iter()
        .cloned()
        .collect();
        for laggard in plan {
            state.replace_called.insert(laggard.agent_id.clone());
            if replace.dry_run {
                tracing::warn!(agent = %laggard.agent_id, app = %laggard.app, lag = laggard.lag.kind(), "would replace the host (replace.dry_run)");
                let entry = history::host_replaced(&laggard, "dry run, nothing called", now);
                state.history.push(entry);
                continue;
            }
            let host = state
                .fleet
                .agents
                .get(&laggard.agent_id)
                .map(|a| a.host.clone())
                .unwrap_or_default();
            state.replace_running += 1;
            let tracker = Arc::clone(self);
            let span =
                tracing::info_span!("replace", agent = %laggard.agent_id, app = %laggard.app);
            let call = async move {
                let outcome = call_replace(&tracker.settings.replace, &laggard, &host).await;
                tracing::warn!(%outcome, "replacement hook called");
                let entry = history::host_replaced(&laggard, &outcome, OffsetDateTime::now_utc());
                let mut state = tracker.state.lock().await;
                state.replace_running = state.replace_running.saturating_sub(1);
                state.history.push(entry);
            };
            tokio::spawn(call.instrument(span));
        }
    }

    /// Sends the remedies [`crate::laggards::to_remedy`] picks to the stuck hosts' agents, each
    /// on the agent's own subject (only the tracker may publish there), and records them.
    async fn remedy_laggards(&self, now: OffsetDateTime) {
        if !self.settings.remedy.enabled {
            return;
        }
        let plan: Vec<(Laggard, crate::laggards::Remedied)> = {
            let mut state = self.state.lock().await;
            let state = &mut *state;
            let all: Vec<Laggard> = self.laggards_of(state, None, now).collect();
            // A host that caught up starts over if it lags again (another version).
            state.remedied.retain(|(agent, app, version), _| {
                all.iter()
                    .any(|l| l.agent_id == *agent && l.app == *app && l.version == *version)
            });
            crate::laggards::to_remedy(&all, now, &self.settings.remedy, &state.remedied)
                .into_iter()
                .map(|(l, r)| (l.clone(), r))
                .collect()
        };
        for (laggard, remedy) in plan {
            self.remedy(laggard, remedy, now).await;
        }
    }

    /// Sends `remedy` to `laggard`'s agent, on the agent's own subject, and records it; one
    /// not sent is tried again on the next tick.
    #[tracing::instrument(skip_all, fields(agent = %laggard.agent_id, app = %laggard.app, version = %laggard.version))]
    async fn remedy(
        &self,
        laggard: Laggard,
        remedy: crate::laggards::Remedied,
        now: OffsetDateTime,
    ) {
        let message = remedy_message(&laggard, remedy, now);
        if let Err(e) = self.send_remedy(&message).await {
            tracing::warn!(error = %e, "remedy not sent; tried again next tick");
            return;
        }
        tracing::warn!(remedy = remedy.said(), "stuck host remedied");
        let mut state = self.state.lock().await;
        state
            .history
            .push(history::host_remedied(&laggard, remedy, now));
        let key = (laggard.agent_id, laggard.app, laggard.version);
        state.remedied.insert(key, remedy);
    }

    /// Publishes `message` on its agent's remedy subject (only the tracker may publish there).
    async fn send_remedy(
        &self,
        message: &fleetcast_events::v1::AgentRemedy,
    ) -> Result<(), async_nats::Error> {
        let bytes = Encoding::Json.encode(message)?;
        let subject = fleetcast_events::names::remedy_subject(&message.agent_id);
        self.bus.client.publish(subject, bytes.into()).await?;
        Ok(())
    }

    /// Records the history entries made since the last call, in order; those that cannot be
    /// recorded now are kept for the next (at most [`HISTORY_BACKLOG`]).
    pub async fn flush_history(&self) {
        let pending = std::mem::take(&mut self.state.lock().await.history);
        if pending.is_empty() {
            return;
        }
        let mut left = Vec::new();
        for (entry, id) in pending {
            if !left.is_empty() {
                left.push((entry, id));
                continue;
            }
            match self.history.record(&entry, &id).await {
                Ok(()) => {}
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, kind = %entry.kind, "history entry not recorded yet; retried");
                    left.push((entry, id));
                }
                // Kept, it would hold up every entry after it for ever.
                Err(e) => {
                    tracing::error!(error = %e, kind = %entry.kind, "history entry cannot be recorded; dropped");
                }
            }
        }
        if left.is_empty() {
            return;
        }
        let mut state = self.state.lock().await;
        // Entries made meanwhile come after those left.
        left.append(&mut state.history);
        if left.len() > HISTORY_BACKLOG {
            let dropped = left.len() - HISTORY_BACKLOG;
            tracing::warn!(
                dropped,
                "history backlog full: oldest unrecorded entries dropped"
            );
            left.drain(..dropped);
        }
        state.history = left;
    }

    /// Writes the desired states that could not be written before (see `State::unwritten`),
    /// for rollouts that are still their app's and still going (or completed).
    async fn write_unwritten(&self) {
        let todo: Vec<_> = {
            let mut state = self.state.lock().await;
            let state = &mut *state;
            let rollouts = &state.rollouts;
            state.unwritten.retain(|(app, version, _)| {
                rollouts
                    .get(app)
                    .is_some_and(|r| r.version == *version && !r.phase.is_stopped())
            });
            state
                .unwritten
                .iter()
                .filter_map(|entry| {
                    let directive = rollouts.get(&entry.0)?.directive.clone();
                    Some((entry.clone(), directive))
                })
                .collect()
        };
        for ((app, version, ring), directive) in todo {
            let span = tracing::info_span!("rollout", %app, %version);
            async {
                let written = self.write_desired(&app, &version, directive.as_ref(), &ring);
                match written.await {
                    Ok(()) => {
                        let key = (app.clone(), version.clone(), ring);
                        self.state.lock().await.unwritten.remove(&key);
                    }
                    Err(e) => {
                        tracing::warn!(%ring, error = %e, "desired state still not written; retried next tick");
                    }
                }
            }
            .instrument(span)
            .await;
        }
    }

    /// Saves the rollouts that changed and, at most every [`AGENTS_SAVE_PERIOD`] (or when
    /// `all`), the agents that changed with the status-stream cursor they reflect. Whatever
    /// could not be written stays marked as changed for the next pass.
    async fn save(&self, all: bool) -> Result<(), TrackerError> {
        self.save_rollouts().await?;
        let Some((agents, cursor)) = self.take_agents(all).await else {
            return Ok(());
        };
        self.save_agents(agents).await?;
        // The cursor last: after a crash, reports since the saved agents are folded again,
        // which is harmless (folding is idempotent per report).
        self.bus
            .fleet
            .put(CURSOR_KEY, cursor.to_string().into_bytes().into())
            .await
            .map_err(|e| TrackerError::store(FLEET_BUCKET, CURSOR_KEY, e))?;
        Ok(())
    }

    /// Writes the rollouts that changed, in order; at the first that cannot be written, it
    /// and those after it stay marked.
    async fn save_rollouts(&self) -> Result<(), TrackerError> {
        let rollouts: Vec<(AppName, Vec<u8>)> = {
            let mut state = self.state.lock().await;
            let state = &mut *state;
            std::mem::take(&mut state.dirty_rollouts)
                .into_iter()
                .filter_map(|app| {
                    let bytes = serde_json::to_vec(state.rollouts.get(&app)?).ok()?;
                    Some((app, bytes))
                })
                .collect()
        };
        let mut unsaved = rollouts.into_iter();
        while let Some((app, bytes)) = unsaved.next() {
            if let Err(e) = self.bus.rollouts.put(&app, bytes.into()).await {
                let error = TrackerError::store(ROLLOUTS_BUCKET, &app, e);
                let mut state = self.state.lock().await;
                state.dirty_rollouts.insert(app);
                state.dirty_rollouts.extend(unsaved.map(|(app, _)| app));
                return Err(error);
            }
        }
        Ok(())
    }

    /// The agents that changed, each with its record (`None`: pruned, to delete), and the
    /// cursor they reflect, when their save is due ([`agents_save_due`]) or `all`. Taken
    /// together, so the cursor saved never runs ahead of the records saved with it.
    async fn take_agents(&self, all: bool) -> Option<(Vec<(AgentId, Option<Vec<u8>>)>, u64)> {
        let mut state = self.state.lock().await;
        let state = &mut *state;
        let due = all
            || agents_save_due(
                state.agents_saved.map(|at| at.elapsed()),
                state.last_status.map(|at| at.elapsed()),
            );
        if !due {
            return None;
        }
        state.agents_saved = Some(tokio::time::Instant::now());
        let agents = std::mem::take(&mut state.dirty_agents)
            .into_iter()
            .map(|id| {
                let bytes = state
                    .fleet
                    .agents
                    .get(&id)
                    .and_then(|a| serde_json::to_vec(a).ok());
                (id, bytes)
            })
            .collect();
        Some((agents, state.cursor))
    }

    /// Writes (or deletes) the agents' records, many at once: a rollout's reports change
    /// hundreds of agents between two saves. Those not written stay marked.
    async fn save_agents(
        &self,
        agents: Vec<(AgentId, Option<Vec<u8>>)>,
    ) -> Result<(), TrackerError> {
        let failed: Vec<(AgentId, async_nats::Error)> = futures::stream::iter(agents)
            .map(|(id, bytes)| async move {
                let written: Result<(), async_nats::Error> = match bytes {
                    Some(b) => self
                        .bus
                        .fleet
                        .put(&id, b.into())
                        .await
                        .map(drop)
                        .map_err(Into::into),
                    None => self.bus.fleet.delete(&id).await.map_err(Into::into),
                };
                written.err().map(|e| (id, e))
            })
            .buffer_unordered(64)
            .filter_map(std::future::ready)
            .collect()
            .await;
        let mut failed = failed.into_iter();
        let Some((id, cause)) = failed.next() else {
            return Ok(());
        };
        let mut state = self.state.lock().await;
        state.dirty_agents.extend(failed.map(|(id, _)| id));
        state.dirty_agents.insert(id.clone());
        Err(TrackerError::store(FLEET_BUCKET, &id, cause))
    }

    /// Answers requests on `subject` (in a queue group, so several trackers could share
    /// them) with what `answer` makes of each, from the reply connection. A request whose
    /// reply subject `reply_allowed` refuses (anything but the requester's inbox) is neither
    /// answered nor acted on: its reply would be a write where the requester says, which
    /// once overwrote a ring's desired state through `$KV.fleetcast-desired.<app>.<ring>`.
    async fn serve<A, F, Fut>(
        &self,
        subject: &str,
        what: &'static str,
        reply_allowed: A,
        shutdown: CancellationToken,
        answer: F,
    ) -> Result<(), TrackerError>
    where
        A: Fn(&async_nats::Message, &str) -> bool,
        F: Fn(async_nats::Message) -> Fut,
        Fut: std::future::Future<Output = Vec<u8>>,
    {
        let mut requests = self
            .bus
            .client
            .queue_subscribe(subject.to_string(), "tracker".into())
            .await
            .map_err(|e| TrackerError::follow(what, e))?;
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                msg = requests.next() => match msg { Some(m) => m, None => return Ok(()) },
            };
            let Some(reply_to) = msg.reply.clone() else {
                continue;
            };
            if !reply_allowed(&msg, reply_to.as_str()) {
                self.refused.inc(&[what, "reply_to"]);
                tracing::warn!(subject = %msg.subject, reply_to = %reply_to, "request naming a reply subject that is not the requester's inbox; not answered");
                continue;
            }
            let reply = answer(msg).await;
            if let Err(e) = self.replies.publish(reply_to, reply.into()).await {
                tracing::debug!(%subject, error = %e, "reply not sent");
            }
        }
    }

    /// Answers agents' slot requests, each only to the inbox of the agent its subject names.
    pub async fn serve_slots(
        self: Arc<Self>,
        shutdown: CancellationToken,
    ) -> Result<(), TrackerError> {
        let this = &*self;
        let agents_inbox = |msg: &async_nats::Message, reply: &str| {
            names::parse_slot_subject(&msg.subject)
                .is_some_and(|from| names::is_agent_inbox(reply, &from.agent_id))
        };
        this.serve(
            SLOT_REQUESTS,
            "slot",
            agents_inbox,
            shutdown,
            |msg| async move {
                let decoded = fleetcast_runtime::consume::decode_payload::<SlotRequest>(
                    msg.headers.as_ref(),
                    &msg.payload,
                );
                let reply = match (names::parse_slot_subject(&msg.subject), decoded) {
                    (Some(from), Ok(request)) => this.slot(from, &request).await,
                    (_, Err(e)) => SlotReply {
                        granted: false,
                        retry_after_ms: 60_000,
                        reason: Some(format!("slot request does not decode: {e}")),
                    },
                    // Not reached: `agents_inbox` refused it already.
                    (None, Ok(_)) => SlotReply {
                        granted: false,
                        retry_after_ms: 60_000,
                        reason: Some(format!("{} names no app and agent", msg.subject)),
                    },
                };
                Encoding::Json.encode(&reply).unwrap_or_default()
            },
        )
        .await
    }

    /// A slot for the agent and app of the request's subject, in the ring the agent's reports
    /// (their subjects) put it in.
    async fn slot(&self, from: SlotSubject, request: &SlotRequest) -> SlotReply {
        let now = OffsetDateTime::now_utc();
        let mut state = self.state.lock().await;
        let state = &mut *state;
        let known_ring = state.fleet.agents.get(&from.agent_id).map(|a| &a.ring);
        let request = match check_slot(&from, request, known_ring) {
            Ok(request) => request,
            Err(refusal) => {
                if refusal.forged {
                    self.refused.inc(&["slot", "identity"]);
                    tracing::warn!(agent = %from.agent_id, app = %from.app, reason = %refusal.reason, "slot request refused");
                }
                return SlotReply {
                    granted: false,
                    retry_after_ms: refusal.retry.as_millis() as u64,
                    reason: Some(refusal.reason),
                };
            }
        };
        let Some(rollout) = state.rollouts.get_mut(&request.app) else {
            return SlotReply {
                granted: false,
                retry_after_ms: 30_000,
                reason: Some(format!("no rollout of {}", request.app)),
            };
        };
        let reply = rollout.request_slot(
            &self.settings.policy_for(rollout),
            &state.fleet,
            &request,
            now,
            self.settings.timing(),
        );
        state.dirty_rollouts.insert(request.app.clone());
        tracing::debug!(agent = %request.agent_id, app = %request.app, granted = reply.granted, reason = ?reply.reason, "slot request");
        reply
    }

    /// Operators' commands (the CLI).
    pub async fn serve_commands(
        self: Arc<Self>,
        shutdown: CancellationToken,
    ) -> Result<(), TrackerError> {
        let this = &*self;
        let inbox = |_: &async_nats::Message, reply: &str| names::is_inbox(reply);
        this.serve(
            TRACKER_REQUESTS,
            "command",
            inbox,
            shutdown,
            |msg| async move {
                // Who asks is the user the subject names, which only that user's credential
                // may publish on; questions come on one subject, open to every reader.
                let user = names::subject_user(&msg.subject, names::TRACKER_COMMAND_PREFIX);
                let is_query = msg.subject.as_str() == names::TRACKER_QUERY;
                let reply = match serde_json::from_slice::<Command>(&msg.payload) {
                    Ok(command) if command.is_query() && is_query => this.query(command).await,
                    Ok(command) if !command.is_query() && user.is_some() => {
                        let actor = user.unwrap_or(names::UNAUTHENTICATED);
                        this.command(actor, command).await
                    }
                    // Only on its own subject: permissions on the subject decide who may steer.
                    Ok(command) => {
                        this.refused.inc(&["command", "subject"]);
                        Reply::failed(format!(
                            "{} is not where this command is sent ({})",
                            msg.subject,
                            if command.is_query() {
                                names::TRACKER_QUERY.to_string()
                            } else {
                                names::tracker_command_subject("<user>")
                            }
                        ))
                    }
                    Err(e) => Reply::failed(format!("not a command: {e}")),
                };
                serde_json::to_vec(&reply).unwrap_or_default()
            },
        )
        .await
    }

    /// A question (status, show, history): changes nothing, recorded nowhere.
    pub async fn query(&self, command: Command) -> Reply {
        match command {
            Command::Status => Reply {
                rollouts: self.rollouts().await,
                agents: self.agents().await,
                ..Reply::ok(String::new())
            },
            Command::History(query) => match self.history.list(&query).await {
                Ok(history) => Reply {
                    history,
                    ..Reply::ok(String::new())
                },
                Err(e) => Reply::failed(e.to_string()),
            },
            Command::Laggards { app } => Reply {
                laggards: self.laggards(app.as_deref()).await,
                ..Reply::ok(String::new())
            },
            Command::Show { app } => {
                let now = OffsetDateTime::now_utc();
                let state = self.state.lock().await;
                match state.rollouts.get(&app) {
                    Some(rollout) => Reply {
                        rollout: Some(self.view(rollout, &state.fleet, now)),
                        ..Reply::ok(String::new())
                    },
                    None => Reply::failed(format!("no rollout of {app}")),
                }
            }
            steering => Reply::failed(format!("{steering:?} is not a question")),
        }
    }

    /// An operator's steering command, as `actor` (the authenticated user: the NATS user of
    /// the request's subject, or `http:<token>`), recorded in the history whatever its outcome.
    pub async fn command(&self, actor: &str, command: Command) -> Reply {
        let reply = match &command {
            Command::Rollback { app, to, ring } => {
                self.request_rollback(app, to, ring.as_ref(), actor).await
            }
            _ => self.steer(&command).await,
        };
        let version = reply
            .rollout
            .as_ref()
            .map(|v| v.version.clone())
            .or_else(|| command.version().cloned());
        let reason = Some(reply.message.clone()).filter(|m| !m.is_empty());
        self.record_action(actor, &command, version, !reply.ok, reason)
            .await;
        reply
    }

    /// Records a refused action that never reached [`Tracker::command`] (e.g. an HTTP request
    /// with a token that may only read).
    pub async fn refused_action(&self, actor: &str, command: &Command, reason: &str) {
        let version = command.version().cloned();
        self.record_action(actor, command, version, true, Some(reason.to_string()))
            .await;
    }

    /// Records one operator action (`operator.action`) by `actor`, and writes it out.
    async fn record_action(
        &self,
        actor: &str,
        command: &Command,
        version: Option<semver::Version>,
        refused: bool,
        reason: Option<String>,
    ) {
        let mut entry = HistoryEntry::new(HistoryKind::OperatorAction, OffsetDateTime::now_utc());
        entry.actor = Some(actor.to_string());
        entry.action = Some(command.name().to_string());
        entry.app = command.app().cloned();
        entry.version = version;
        entry.target = command.target().cloned();
        entry.refused = refused;
        entry.reason = reason;
        // Each request is one action: a random id (never deduplicated against another).
        let id = format!("action:{}", uuid_like());
        self.state.lock().await.history.push((entry, id));
        self.flush_history().await;
    }

    /// Asks the signer for a rollback, on the tracker's own subject; the rollout follows
    /// when the directive is signed ([`Tracker::follow_rollbacks`]).
    async fn request_rollback(
        &self,
        app: &AppName,
        to: &semver::Version,
        ring: Option<&RingName>,
        actor: &str,
    ) -> Reply {
        match self
            .bus
            .records
            .request_rollback(&self.bus, app, to, ring, SERVICE, actor)
            .await
        {
            Ok(from) => Reply::ok(format!(
                "rollback of {app}{} to {to} (replacing up to {from}) requested",
                ring.map(|r| format!(" ring {r}")).unwrap_or_default()
            )),
            Err(e) => Reply::failed(e.to_string()),
        }
    }

    async fn steer(&self, command: &Command) -> Reply {
        let now = OffsetDateTime::now_utc();
        let Some(app) = command.app().cloned() else {
            return Reply::failed(format!("{} is not a steering command", command.name()));
        };
        let mut state = self.state.lock().await;
        let state = &mut *state;
        let Some(rollout) = state.rollouts.get_mut(&app) else {
            return Reply::failed(format!("no rollout of {app}"));
        };
        let before = rollout.clone();
        let result = match command.clone() {
            Command::Status
            | Command::Show { .. }
            | Command::History(_)
            | Command::Laggards { .. }
            | Command::Rollback { .. } => Ok(String::new()),
            Command::Approve {
                version, target, ..
            } => rollout
                .approve(version.as_ref(), target.as_ref(), now)
                .map(|()| match &target {
                    Some(t) => {
                        format!("{app} {} approved for the hosts where {t}", rollout.version)
                    }
                    None => format!("{app} {} approved", rollout.version),
                }),
            Command::Pause { .. } => rollout
                .set_paused(true)
                .map(|()| format!("{app} {} paused", rollout.version)),
            Command::Resume { .. } => rollout
                .set_paused(false)
                .map(|()| format!("{app} {} resumed", rollout.version)),
            Command::Abort { .. } => {
                rollout.abort("aborted by an operator".into());
                Ok(format!("{app} {} aborted", rollout.version))
            }
        };
        state.dirty_rollouts.insert(app.clone());
        let policy = self.settings.policy_for(rollout);
        let entries = history::transitions(Some(&before), rollout, &ring_names(&policy), now);
        let view = self.view(rollout, &state.fleet, now);
        state.history.extend(entries);
        let (ok, message) = match result {
            Ok(m) => (true, m),
            Err(e) => (false, e.to_string()),
        };
        Reply {
            ok,
            rollout: Some(view),
            ..Reply::ok(message)
        }
    }

    fn view(&self, rollout: &Rollout, fleet: &Fleet, now: OffsetDateTime) -> RolloutSummary {
        rollout.summary(rollout.progress(
            &self.settings.policy_for(rollout),
            fleet,
            now,
            self.settings.timing(),
        ))
    }

    /// Every rollout with its progress (HTTP API).
    pub async fn rollouts(&self) -> Vec<RolloutSummary> {
        let now = OffsetDateTime::now_utc();
        let state = self.state.lock().await;
        state
            .rollouts
            .values()
            .map(|r| self.view(r, &state.fleet, now))
            .collect()
    }

    /// Every release record (of `app` only, when given), by app, with the hosts that run
    /// each version (HTTP API).
    pub async fn releases(
        &self,
        app: Option<&AppName>,
    ) -> Result<Vec<AppReleases>, fleetcast_runtime::releases::RecordError> {
        let app = app.map(AppName::as_str);
        let records = self.bus.records.release_records(app).await?;
        Ok(releases::by_app(records, &self.agents().await))
    }

    /// The app's rollout with its timeline and the history's marks of it (HTTP API); `None`
    /// when the app has no rollout.
    pub async fn timeline(&self, app: &AppName) -> Option<TimelineView> {
        let (rollout, samples) = {
            let now = OffsetDateTime::now_utc();
            let state = self.state.lock().await;
            let r = state.rollouts.get(app)?;
            (self.view(r, &state.fleet, now), r.timeline.clone())
        };
        let query = HistoryQuery {
            app: Some(app.clone()),
            version: Some(rollout.version.clone()),
            limit: Some(MARKS_READ),
            ..Default::default()
        };
        // Cut off, the history cannot be read: the plot is drawn without its marks at once,
        // rather than after a request's timeout.
        let read = if self.is_connected() {
            self.history.list(&query).await
        } else {
            Err(history::HistoryError::CutOff)
        };
        let (marks, marks_error) = match read {
            Ok(entries) => (timeline::marks(entries, rollout.created), None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        Some(TimelineView {
            rollout,
            samples,
            marks,
            marks_error,
        })
    }

    /// Whether the tracker's connection to NATS is up now.
    pub fn is_connected(&self) -> bool {
        self.bus.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The Prometheus text exposition (HTTP `/metrics`).
    pub async fn metrics(&self) -> Result<String, std::fmt::Error> {
        let report_lag_s = self.state.lock().await.report_lag_s;
        let view = crate::metrics::FleetView {
            agents: self.agents().await,
            rollouts: self.rollouts().await,
            report_lag_s,
        };
        crate::metrics::render(&self.registry, view)
    }

    /// The laggards of every rollout, or of `app`'s.
    fn laggards_of<'a>(
        &'a self,
        state: &'a State,
        app: Option<&'a str>,
        now: OffsetDateTime,
    ) -> impl Iterator<Item = Laggard> + 'a {
        state
            .rollouts
            .values()
            .filter(move |r| app.is_none_or(|a| r.app == a))
            .flat_map(move |r| {
                crate::laggards::laggards(
                    r,
                    &self.settings.policy_for(r),
                    &state.fleet,
                    now,
                    self.settings.timing(),
                    self.settings.stuck_after,
                )
            })
    }

    /// The laggards of every rollout, or of `app`'s (HTTP API, `fleetcast laggards`).
    pub async fn laggards(&self, app: Option<&str>) -> Vec<crate::laggards::Laggard> {
        let now = OffsetDateTime::now_utc();
        let state = self.state.lock().await;
        let remediation = if self.settings.replace.dry_run {
            "replacement: dry run, nothing called"
        } else {
            "replacement hook called"
        };
        self.laggards_of(&state, app, now)
            .map(|mut l| {
                let remedied = state
                    .remedied
                    .get(&(l.agent_id.clone(), l.app.clone(), l.version.clone()))
                    .map(|r| r.said());
                let replaced = state
                    .replace_called
                    .contains(&l.agent_id)
                    .then_some(remediation);
                let done: Vec<&str> = remedied.into_iter().chain(replaced).collect();
                if !done.is_empty() {
                    l.remediation = Some(done.join("; "));
                }
                l
            })
            .collect()
    }

    /// Every agent, stale ones marked (HTTP API).
    pub async fn agents(&self) -> Vec<AgentSummary> {
        let now = OffsetDateTime::now_utc();
        let state = self.state.lock().await;
        state
            .fleet
            .agents
            .values()
            .map(|a| a.summary(a.is_stale(now, self.settings.stale_after)))
            .collect()
    }
}

/// What `laggard`'s agent is told to do (`remedy`), and why.
fn remedy_message(
    laggard: &Laggard,
    remedy: crate::laggards::Remedied,
    now: OffsetDateTime,
) -> fleetcast_events::v1::AgentRemedy {
    let action = match remedy {
        crate::laggards::Remedied::Retry => fleetcast_events::v1::RemedyAction::Retry {
            app: laggard.app.clone(),
        },
        crate::laggards::Remedied::Restart => fleetcast_events::v1::RemedyAction::Restart,
    };
    fleetcast_events::v1::AgentRemedy {
        agent_id: laggard.agent_id.clone(),
        action,
        reason: format!(
            "{} {} not running {} since {}",
            laggard.lag.kind(),
            laggard.app,
            laggard.version,
            match laggard.lag {
                crate::laggards::Lag::Stuck { since } => since.to_string(),
                _ => String::new(),
            }
        ),
        at: now,
    }
}

/// Runs the replacement hook for `laggard` on `host`: how it ended, in words (its log lines in
/// the span of the laggard the caller made).
async fn call_replace(
    settings: &crate::laggards::ReplaceSettings,
    laggard: &Laggard,
    host: &str,
) -> String {
    let Some((program, args)) = settings.command.split_first() else {
        return "no command".into();
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env("FLEETCAST_REPLACE_AGENT", &laggard.agent_id)
        .env("FLEETCAST_REPLACE_HOST", host)
        .env("FLEETCAST_REPLACE_RING", &laggard.ring)
        .env("FLEETCAST_REPLACE_APP", &laggard.app)
        .env("FLEETCAST_REPLACE_VERSION", laggard.version.to_string())
        .env("FLEETCAST_REPLACE_LAG", laggard.lag.kind())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(settings.timeout, command.output()).await {
        Err(_) => format!("failed: still running after {:?}, killed", settings.timeout),
        Ok(Err(e)) => format!("failed: {program}: {e}"),
        Ok(Ok(out)) if out.status.success() => "called, exit 0".into(),
        Ok(Ok(out)) => {
            // What it said goes to the log; the history keeps the outcome.
            let stderr = String::from_utf8_lossy(&out.stderr);
            tracing::warn!(status = %out.status, stderr = %stderr.trim(), "replacement hook failed");
            format!("failed: {}", out.status)
        }
    }
}

/// An error that may pass by itself (NATS back, a leader elected), so that what met it is
/// worth doing again.
trait Transient: std::fmt::Display {
    fn is_transient(&self) -> bool;
}

impl Transient for fleetcast_runtime::releases::RecordError {
    fn is_transient(&self) -> bool {
        fleetcast_runtime::releases::RecordError::is_transient(self)
    }
}

impl Transient for history::HistoryError {
    fn is_transient(&self) -> bool {
        history::HistoryError::is_transient(self)
    }
}

/// What a consumer does with an event it could not handle: deliver it again when the failure
/// may pass; else drop it, saying so (delivered again, it would fail the same way, for ever).
fn retry_unless_permanent(error: &impl Transient) -> Outcome {
    if error.is_transient() {
        return Outcome::Retry(error.to_string());
    }
    tracing::error!(%error, "event dropped: handling it again would fail the same way");
    Outcome::Done
}

/// The names of a policy's rings, in order (what history entries name a ring by).
fn ring_names(policy: &crate::policy::AppPolicy) -> Vec<RingName> {
    policy.rings.iter().map(|r| r.name.clone()).collect()
}

/// A unique id for a history entry that stands for itself (an operator's request).
fn uuid_like() -> String {
    let mut bytes = [0u8; 16];
    // Without randomness (never on Linux), the time still tells requests apart.
    if getrandom::fill(&mut bytes).is_err() {
        return OffsetDateTime::now_utc().unix_timestamp_nanos().to_string();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `fleetcast_tracker_refused_total{what, reason}`: what was refused (`heartbeat`, `status`,
/// `report`, `slot`, `command`) and why: `identity` (the body names another agent, ring or app
/// than the subject), `reply_to` (the reply subject is not the requester's inbox), `subject`
/// (a report subject that names no agent), `decode`.
fn refused_counter(registry: &mut prometheus_client::registry::Registry) -> CounterFamily<2> {
    CounterFamily::new(
        registry,
        "fleetcast_tracker_refused_total",
        "Agent reports and requests the tracker refused, by what and why (identity: the body disagrees with its subject; reply_to: not the requester's inbox).",
        ["what", "reason"],
    )
    .starting_at_zero(&[
        ["heartbeat", "identity"],
        ["status", "identity"],
        ["slot", "identity"],
        ["slot", "reply_to"],
        ["command", "reply_to"],
    ])
}

/// A report whose body names another agent, ring or app than its subject: a forgery (only
/// the subject's agent may publish there), or a badly broken agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum IdentityMismatch {
    #[error("body says agent {body:?}, the subject agent {subject:?}")]
    Agent { body: AgentId, subject: AgentId },
    #[error("body says ring {body:?}, the subject ring {subject:?}")]
    Ring { body: RingName, subject: RingName },
    #[error("body says app {body:?}, the subject app {subject:?}")]
    App { body: AppName, subject: AppName },
}

/// A heartbeat is the subject's agent's, in the subject's ring, or it is refused.
fn check_heartbeat(from: &ReportSubject, hb: &AgentHeartbeat) -> Result<(), IdentityMismatch> {
    if hb.agent_id != from.agent_id {
        return Err(IdentityMismatch::Agent {
            body: hb.agent_id.clone(),
            subject: from.agent_id.clone(),
        });
    }
    if hb.ring != from.ring {
        return Err(IdentityMismatch::Ring {
            body: hb.ring.clone(),
            subject: from.ring.clone(),
        });
    }
    Ok(())
}

/// A status is the subject's agent's, about the subject's app, or it is refused.
fn check_status(
    from: &ReportSubject,
    app: &AppName,
    st: &AgentStatus,
) -> Result<(), IdentityMismatch> {
    if st.agent_id != from.agent_id {
        return Err(IdentityMismatch::Agent {
            body: st.agent_id.clone(),
            subject: from.agent_id.clone(),
        });
    }
    if st.app != *app {
        return Err(IdentityMismatch::App {
            body: st.app.clone(),
            subject: app.clone(),
        });
    }
    Ok(())
}

/// Why a slot request is not considered.
#[derive(Debug)]
struct SlotRefusal {
    /// The body names another agent, app or ring than the agent's credential and reports:
    /// counted and logged as a forgery. (Else the agent is only not known yet.)
    forged: bool,
    reason: String,
    retry: std::time::Duration,
}

/// The request as the tracker acts on it: the agent and app of its subject, the ring the
/// agent's reports put it in (`ring`, `None` before its first report).
fn check_slot(
    from: &SlotSubject,
    request: &SlotRequest,
    ring: Option<&RingName>,
) -> Result<SlotRequest, SlotRefusal> {
    let forged = |reason: String| SlotRefusal {
        forged: true,
        reason,
        retry: std::time::Duration::from_secs(60),
    };
    if request.agent_id != from.agent_id {
        return Err(forged(format!(
            "slot request on {}'s subject names agent {}",
            from.agent_id, request.agent_id
        )));
    }
    if request.app != from.app {
        return Err(forged(format!(
            "slot request on {}'s subject names app {}",
            from.app, request.app
        )));
    }
    let Some(ring) = ring else {
        // Its first report is on its way (the agent reports before it asks).
        return Err(SlotRefusal {
            forged: false,
            reason: format!("no report from {} yet", from.agent_id),
            retry: std::time::Duration::from_secs(1),
        });
    };
    if request.ring != *ring {
        return Err(SlotRefusal {
            retry: std::time::Duration::from_secs(5),
            ..forged(format!(
                "slot request names ring {}, {}'s reports ring {ring}",
                request.ring, from.agent_id
            ))
        });
    }
    Ok(SlotRequest {
        agent_id: from.agent_id.clone(),
        app: from.app.clone(),
        ring: ring.clone(),
        version: request.version.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn heartbeat(agent_id: &str, ring: &str) -> AgentHeartbeat {
        AgentHeartbeat {
            agent_id: AgentId::try_from(agent_id).expect("name"),
            host: "host".into(),
            ring: RingName::try_from(ring).expect("name"),
            labels: Default::default(),
            apps: Vec::new(),
            agent_version: None,
            metadata: None,
            at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn status(agent_id: &str, app: &str) -> AgentStatus {
        AgentStatus {
            agent_id: AgentId::try_from(agent_id).expect("name"),
            app: AppName::try_from(app).expect("name"),
            state: fleetcast_events::v1::AppState::RolledBack,
            version: Some(semver::Version::new(2, 0, 0)),
            progress_bytes: None,
            reason: Some("forged".into()),
            at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn slot_request(agent_id: &str, app: &str, ring: &str) -> SlotRequest {
        SlotRequest {
            agent_id: AgentId::try_from(agent_id).expect("name"),
            app: AppName::try_from(app).expect("name"),
            ring: RingName::try_from(ring).expect("name"),
            version: semver::Version::new(2, 0, 0),
        }
    }

    /// A report whose body names another agent, ring or app than its subject (which only
    /// the subject's agent may publish on) is refused; one that agrees is taken.
    #[test]
    fn a_report_whose_body_disagrees_with_its_subject_is_refused() {
        let hb_subject = names::agent_heartbeat_subject("h1", "canary");
        let from = names::parse_report_subject(&hb_subject).expect("subject");
        assert!(check_heartbeat(&from, &heartbeat("h1", "canary")).is_ok());
        let other_agent = check_heartbeat(&from, &heartbeat("h2", "canary"));
        assert!(other_agent.is_err_and(|e| e.to_string().contains("\"h2\"")));
        let other_ring = check_heartbeat(&from, &heartbeat("h1", "broad"));
        assert_eq!(
            other_ring,
            Err(IdentityMismatch::Ring {
                body: RingName::from_static("broad"),
                subject: RingName::from_static("canary"),
            })
        );
        assert!(other_ring.is_err_and(|e| e.to_string().contains("\"broad\"")));

        let st_subject = names::agent_status_subject("h1", "canary", "shapp");
        let from = names::parse_report_subject(&st_subject).expect("subject");
        let ReportKind::Status { app } = &from.kind else {
            panic!("a status subject")
        };
        assert!(check_status(&from, app, &status("h1", "shapp")).is_ok());
        assert!(matches!(
            check_status(&from, app, &status("h2", "shapp")),
            Err(IdentityMismatch::Agent { .. })
        ));
        assert!(matches!(
            check_status(&from, app, &status("h1", "otherapp")),
            Err(IdentityMismatch::App { .. })
        ));
    }

    /// A slot request is acted on as the subject's agent and app, in the ring the agent's
    /// reports put it in; a body naming others is a forgery, an agent not heard of yet is
    /// asked to wait.
    #[test]
    fn a_slot_request_is_its_subjects_agent_in_its_reported_ring() {
        let subject = names::slot_subject("shapp", "h1");
        let from = names::parse_slot_subject(&subject).expect("subject");
        let taken = check_slot(
            &from,
            &slot_request("h1", "shapp", "canary"),
            Some(&RingName::from_static("canary")),
        )
        .expect("ok");
        assert_eq!(taken, slot_request("h1", "shapp", "canary"));
        for (request, why) in [
            (slot_request("h2", "shapp", "canary"), "agent h2"),
            (slot_request("h1", "otherapp", "canary"), "app otherapp"),
            (slot_request("h1", "shapp", "broad"), "ring broad"),
        ] {
            let canary = RingName::from_static("canary");
            let refusal = check_slot(&from, &request, Some(&canary)).expect_err("forged");
            assert!(
                refusal.forged && refusal.reason.contains(why),
                "{refusal:?}"
            );
        }
        let unknown = check_slot(&from, &slot_request("h1", "shapp", "canary"), None)
            .expect_err("unknown agent");
        assert!(!unknown.forged, "{unknown:?}");
    }

    /// An event whose handling failed is delivered again only when the failure may pass: a
    /// store that did not answer, not a release that is not known or an entry that cannot be
    /// encoded (those would fail the same way for ever).
    #[test]
    fn only_failures_that_may_pass_are_retried() {
        use fleetcast_runtime::BusError;
        use fleetcast_runtime::releases::RecordError;
        let unreachable = RecordError::Store {
            bucket: "fleetcast-desired",
            key: "web.canary".into(),
            reason: "timed out".into(),
        };
        assert!(matches!(
            retry_unless_permanent(&unreachable),
            Outcome::Retry(why) if why.contains("timed out")
        ));
        let unknown = RecordError::Refused("web 1.0.0 is not a known release".into());
        assert!(matches!(retry_unless_permanent(&unknown), Outcome::Done));
        let unpublished = history::HistoryError::Publish(BusError::Publish {
            subject: "fleetcast.v1.history.web.rollout.started".into(),
            reason: "no responders".into(),
        });
        assert!(matches!(
            retry_unless_permanent(&unpublished),
            Outcome::Retry(_)
        ));
        let unencodable = history::HistoryError::Publish(BusError::Encode {
            subject: "fleetcast.v1.history.web.rollout.started".into(),
            reason: "key must be a string".into(),
        });
        assert!(matches!(
            retry_unless_permanent(&unencodable),
            Outcome::Done
        ));
    }

    #[test]
    fn agents_are_saved_between_report_bursts_and_at_least_every_few_seconds() {
        let ms = Duration::from_millis;
        // Never saved yet: now.
        assert!(agents_save_due(None, Some(ms(1))));
        // Saved a moment ago: not again, quiet or not.
        assert!(!agents_save_due(Some(ms(300)), None));
        assert!(!agents_save_due(Some(ms(300)), Some(ms(5_000))));
        // Due, and the fleet quiet (or only heartbeats): now.
        assert!(agents_save_due(Some(ms(1_500)), None));
        assert!(agents_save_due(Some(ms(1_500)), Some(AGENTS_SAVE_QUIET)));
        // Due, but a ring's agents are reacting: after the burst...
        assert!(!agents_save_due(Some(ms(1_500)), Some(ms(20))));
        assert!(!agents_save_due(Some(ms(9_000)), Some(ms(20))));
        // ...or once the last save is that old, however busy.
        assert!(agents_save_due(Some(AGENTS_SAVE_MAX), Some(ms(20))));
    }
}
