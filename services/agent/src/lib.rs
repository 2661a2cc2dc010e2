//! The agent: runs on every host, supervises the applications of its config and moves each to
//! its desired version safely.
//!
//! [`supervisor`] runs the app in its own process group (backoff, crash-loop pause, drain);
//! [`install`] keeps versions side by side with an atomic `current`; [`assemble`] builds a
//! verified version from reused and fetched chunks; [`health`] is the gate a new version must
//! pass; [`journal`] makes every step recoverable; [`updater`] runs the update and rollback;
//! [`window`] holds switches to the update windows; [`fault`] has the crash-matrix points.

pub mod assemble;
pub mod crash_policy;
pub mod fault;
mod follow;
pub mod health;
pub mod install;
pub mod isolation;
pub mod journal;
pub mod launched;
mod metrics;
pub mod output;
mod patching;
pub mod release_tree;
pub mod settings;
pub mod sockets;
pub mod supervisor;
pub mod updater;

use std::sync::Arc;
use std::time::Duration;

use fleetcast_events::names::agent_heartbeat_subject;
use fleetcast_events::v1::{AgentHeartbeat, DesiredState};
use fleetcast_events::{AgentId, AppName, Encoding};
use fleetcast_runtime::observe::{self, Endpoint, ObserveError};
use fleetcast_runtime::{AgentBus, BusError};
use futures::StreamExt;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use launched::Launcher;
pub use settings::Settings;
use updater::{AppRunner, Applied, UpdateError};

pub const SERVICE: &str = "agent";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Settings(#[from] fleetcast_runtime::SettingsError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Observe(#[from] ObserveError),
    #[error("isolating the apps: data_dir {}: {source}", .path.display())]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("isolating the apps: {0}")]
    Isolation(#[from] isolation::IsolationError),
}

/// Runs every configured app and keeps it on its desired version until `shutdown`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), AgentError> {
    settings.validate()?;
    let agent_id = settings.id()?;
    isolation::prepare_data_dir(&settings.data_dir).map_err(|source| AgentError::DataDir {
        path: settings.data_dir.clone(),
        source,
    })?;
    if settings.apps.iter().any(|a| a.user.is_some()) {
        isolation::check_capabilities()?;
    }
    let trust = Arc::new(settings.trust()?);
    let launcher = launched::init();
    if let Some(launcher) = launcher {
        follow_launcher(launcher, &shutdown);
    }
    // Opt-in: nothing of it exists (no task, no listener) unless `metrics_listen` is set.
    let observed = match settings.metrics_listen {
        Some(addr) => Some(Observed::serve(addr, &settings, &shutdown).await?),
        None => None,
    };
    // Replies to the agent's requests (slots, reads) come back under its own inbox prefix:
    // its NATS identity may read nothing else, and the tracker answers a slot request only
    // there.
    let mut nats = settings.nats.clone();
    nats.inbox_prefix
        .get_or_insert_with(|| fleetcast_events::names::agent_inbox_prefix(&agent_id));
    let bus = match AgentBus::connect(&nats, &format!("agent-{agent_id}"), &shutdown).await {
        Err(BusError::Cancelled) => return Ok(()),
        other => other?,
    };
    if let Some(observed) = &observed {
        observed.endpoint.connected(&bus.client);
    }
    // Roots published while the agent was away are walked before any announcement is
    // judged, so a release signed by a newly rotated key is not refused first.
    let following = trust.clone().start_following(bus.clone()).await;
    let host = Host {
        settings: Arc::new(settings),
        agent_id,
        trust,
        bus,
        shutdown,
    };
    let mut apps = host.settings.apps.clone();
    // The agent's own releases, followed like an app's (only under the launcher, which runs
    // the new agent on trial and goes back if it fails).
    if launcher.is_some() && host.settings.self_update.enabled {
        apps.push(settings::AppSettings::for_agent());
    }
    // A trial agent qualifies with its first heartbeat after it read its desired state, then
    // becomes current after the soak (the agent's own app commits it).
    let (soaked_tx, soaked_rx) = tokio::sync::oneshot::channel::<()>();
    let soaked_tx = launcher.filter(|l| l.is_trial()).map(|_| soaked_tx);
    let (mut tasks, beats) = host.start_apps(&apps, observed.as_ref(), soaked_rx);
    tasks.push(tokio::spawn(
        following.run(host.settings.recheck, host.shutdown.clone()),
    ));
    host.beat(&beats, launcher.zip(soaked_tx)).await;
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}

/// Under the launcher: its exit requests, and its "detach" (SIGUSR2: exit and leave the apps
/// running, when a launcher restarted while this agent ran, or a trial did not qualify in
/// time).
fn follow_launcher(launcher: &'static Launcher, shutdown: &CancellationToken) {
    tracing::info!(root = %launcher.root().display(), release = ?launcher.release(), trial = launcher.is_trial(), "started by fleetcast-launcher: the apps outlive this process and the next agent adopts them");
    launched::on_exit_request(shutdown.clone());
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2()) {
        Ok(mut detach) => {
            tokio::spawn(async move {
                if detach.recv().await.is_some() {
                    tracing::warn!(
                        "the launcher asks this agent to exit and leave the apps running"
                    );
                    launched::request_exit(launched::Exit::Detach);
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot handle SIGUSR2 (detach)"),
    }
}

/// The agent's `/metrics` endpoint (`metrics_listen`).
struct Observed {
    metrics: Arc<metrics::AgentMetrics>,
    endpoint: Arc<Endpoint>,
    /// Kept for as long as the agent runs: the endpoint serves until it is dropped.
    _serving: observe::Serving,
}

impl Observed {
    async fn serve(
        addr: std::net::SocketAddr,
        settings: &Settings,
        shutdown: &CancellationToken,
    ) -> Result<Self, AgentError> {
        let (metrics, registry) = metrics::AgentMetrics::registered();
        let endpoint = Endpoint::new(metrics::IDENTITY, registry);
        let serving = observe::serve(
            addr,
            settings.metrics_tls.as_ref(),
            endpoint.clone(),
            shutdown,
        )
        .await?;
        Ok(Observed {
            metrics,
            endpoint,
            _serving: serving,
        })
    }
}

/// What every app's loop and the heartbeat share.
#[derive(Clone)]
struct Host {
    settings: Arc<Settings>,
    agent_id: AgentId,
    trust: Arc<fleetcast_runtime::Trust>,
    bus: AgentBus,
    shutdown: CancellationToken,
}

impl Host {
    /// A loop per app (see `app_loop`), and the task that passes the tracker's remedies on to
    /// them: the tasks, and each app's latest state for the heartbeat.
    fn start_apps(
        &self,
        apps: &[settings::AppSettings],
        observed: Option<&Observed>,
        soaked: tokio::sync::oneshot::Receiver<()>,
    ) -> (Vec<tokio::task::JoinHandle<()>>, Vec<Beat>) {
        let mut soaked = Some(soaked);
        let (mut tasks, mut beats) = (Vec::new(), Vec::new());
        // The tracker's "retry now" for one app, passed to its loop.
        let mut retries = std::collections::BTreeMap::new();
        for app in apps {
            let runner = self.runner(app);
            let first = match &runner {
                Ok(runner) => runner.snapshot(),
                Err(_) => updater::Snapshot::failed(&app.name),
            };
            let (beat, rx) = watch::channel(first);
            if let Some(observed) = observed {
                tasks.push(tokio::spawn(observed.metrics.follow(rx.clone())));
            }
            beats.push(rx);
            let (retry_tx, retry) = tokio::sync::mpsc::channel(1);
            retries.insert(app.name.clone(), retry_tx);
            let is_agent = *app == settings::AppSettings::for_agent();
            let nudges = Nudges {
                soaked: if is_agent { soaked.take() } else { None },
                retry,
            };
            let follow = self.clone().follow_app(app.clone(), runner, beat, nudges);
            tasks.push(tokio::spawn(follow));
        }
        let remedies = fleetcast_events::names::remedy_subject(&self.agent_id);
        let this = self.clone();
        tasks.push(tokio::spawn(async move {
            match this.bus.client.subscribe(remedies).await {
                Ok(remedies) => {
                    follow_remedies(remedies, this.agent_id, retries, this.shutdown).await
                }
                Err(e) => tracing::warn!(error = %e, "the tracker's remedies cannot be received"),
            }
        }));
        (tasks, beats)
    }

    fn runner(&self, app: &settings::AppSettings) -> Result<AppRunner, UpdateError> {
        let (settings, trust) = (self.settings.clone(), self.trust.clone());
        AppRunner::new(app.clone(), settings, trust, self.bus.clone())
    }

    /// One app, for as long as the agent runs. An app whose state cannot be read (both
    /// journal slots torn, its folder unusable: `runner` failed) is isolated: reported failed,
    /// neither supervised nor updated until it can be read again, while every other app on the
    /// host goes on. Everything logged for the app, here and by its runner, is in its span.
    #[tracing::instrument(name = "app", skip_all, fields(app = %app.name))]
    async fn follow_app(
        self,
        app: settings::AppSettings,
        runner: Result<AppRunner, UpdateError>,
        beat: watch::Sender<updater::Snapshot>,
        nudges: Nudges,
    ) {
        let roots = self.trust.root_updates();
        let runner = match runner {
            Ok(runner) => runner,
            Err(e) => match self.isolated(e, &app).await {
                Some(runner) => runner,
                None => return,
            },
        };
        let _ = beat.send(runner.snapshot());
        let recheck = spread(&self.agent_id, &app.name, self.settings.recheck);
        let (bus, shutdown) = (self.bus.clone(), self.shutdown.clone());
        app_loop(runner, bus, recheck, roots, beat, nudges, shutdown).await;
    }

    /// An app that could not be set up (its journal unreadable: a crash tears one slot at
    /// most, so both torn is damage that guessing could make worse by starting the wrong
    /// version). It is reported failed with the reason, again on every `recheck` (a tracker
    /// that missed it hears it then), and set up again each time: once repaired (the journal
    /// restored or removed by an operator), it is supervised and updated from then on. `None`:
    /// shut down first.
    async fn isolated(
        &self,
        mut error: UpdateError,
        app: &settings::AppSettings,
    ) -> Option<AppRunner> {
        let name = &app.name;
        loop {
            let reason = format!("isolated, not supervised or updated until repaired: {error}");
            tracing::error!(%reason, "app isolated");
            let status = fleetcast_events::v1::AgentStatus {
                agent_id: self.agent_id.clone(),
                app: name.clone(),
                state: fleetcast_events::v1::AppState::Failed,
                version: None,
                progress_bytes: None,
                reason: Some(reason),
                at: OffsetDateTime::now_utc(),
            };
            let subject = fleetcast_events::names::agent_status_subject(
                &self.agent_id,
                &self.settings.ring,
                name,
            );
            if let Err(e) = self
                .bus
                .report_event(&subject, &status, Encoding::MsgPack)
                .await
            {
                tracing::warn!(error = %e, "status not published");
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                _ = tokio::time::sleep(self.settings.recheck.max(Duration::from_secs(1))) => {}
            }
            match self.runner(app) {
                Ok(runner) => {
                    tracing::info!("app state readable again; supervising it");
                    return Some(runner);
                }
                Err(e) => error = e,
            }
        }
    }

    /// Heartbeats until shutdown: at once (the tracker learns of the agent), then on the
    /// agent's own phase. A trial agent (`trial`: the launcher, and the soak to start once
    /// qualified) beats as soon as it has read its desired state: that beat qualifies it.
    async fn beat(&self, beats: &[Beat], mut trial: Option<(&'static Launcher, Soaked)>) {
        let mut heartbeat = Heartbeat::default();
        let mut ticker = spread(&self.agent_id, "heartbeat", self.settings.heartbeat);
        ticker.reset_immediately();
        let (mut beat_failed, mut nudged) = (false, false);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                // The launcher's deadline and the rollout are waiting on the trial's beat. (A
                // wait, not a condition of this arm: a condition is checked only when the
                // select starts, and a read made just after would wait for the next tick.)
                // Once per beat: again 20 ms after a beat that was not published.
                _ = async {
                    launched::desired_read_now().await;
                    if beat_failed {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }, if trial.is_some() && !nudged => {
                    nudged = true;
                    ticker.reset_immediately();
                }
                _ = ticker.tick() => {
                    let beat = heartbeat.next(self, beats);
                    let subject = agent_heartbeat_subject(&self.agent_id, &self.settings.ring);
                    let published = self.bus.report_event(&subject, &beat, Encoding::MsgPack).await;
                    beat_failed = published.is_err();
                    nudged = false;
                    match published {
                        Err(e) => tracing::debug!(error = %e, "heartbeat not published"),
                        Ok(()) => {
                            if launched::desired_was_read()
                                && let Some((launcher, tx)) = trial.take()
                            {
                                qualified(launcher, tx, self.settings.self_update.soak);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One app's latest state, for the heartbeat.
type Beat = watch::Receiver<updater::Snapshot>;

/// Ends the trial's soak: the agent's own app commits it.
type Soaked = tokio::sync::oneshot::Sender<()>;

/// What the heartbeat remembers between beats: the trust state it last logged.
#[derive(Default)]
struct Heartbeat {
    was_stale: bool,
    last_notes: Vec<String>,
    host_name: Option<String>,
}

impl Heartbeat {
    /// The next heartbeat: every app's state and the trust metadata's, whose changes are
    /// logged once.
    fn next(&mut self, host: &Host, beats: &[Beat]) -> AgentHeartbeat {
        let accepted: Vec<_> = beats
            .iter()
            .map(|b| {
                let b = b.borrow();
                (b.beat.app.clone(), b.accepted.clone())
            })
            .collect();
        let metadata = host.trust.status(
            OffsetDateTime::now_utc(),
            host.settings.max_metadata_age(),
            &accepted,
        );
        if metadata.stale != self.was_stale {
            self.was_stale = metadata.stale;
            match &metadata.reason {
                Some(reason) => tracing::warn!(%reason, "stale metadata"),
                None => tracing::info!("metadata fresh again"),
            }
        }
        if metadata.notes != self.last_notes {
            for note in metadata
                .notes
                .iter()
                .filter(|n| !self.last_notes.contains(n))
            {
                tracing::warn!(%note, "trust state");
            }
            self.last_notes.clone_from(&metadata.notes);
        }
        let host_name = self.host_name.get_or_insert_with(|| {
            std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default()
        });
        AgentHeartbeat {
            agent_id: host.agent_id.clone(),
            host: host_name.clone(),
            ring: host.settings.ring.clone(),
            labels: host.settings.labels.clone(),
            apps: beats
                .iter()
                .map(|b| b.borrow().beat_at(tokio::time::Instant::now()))
                .collect(),
            agent_version: Some(launched::agent_version()),
            metadata: Some(metadata),
            at: OffsetDateTime::now_utc(),
        }
    }
}

/// What reaches one app's loop besides its desired state: the end of this agent's soak (its
/// own app, on trial), the tracker's "retry now".
struct Nudges {
    soaked: Option<tokio::sync::oneshot::Receiver<()>>,
    retry: tokio::sync::mpsc::Receiver<()>,
}

/// The tracker's remedies for this agent ([`fleetcast_events::v1::AgentRemedy`]), on its own
/// subject, which only the tracker may publish on: "retry now" goes to the app's loop,
/// "restart" ends this agent for the launcher to start again (the apps keep running). A
/// message that does not decode or names another agent is ignored, with a warning.
async fn follow_remedies(
    mut remedies: async_nats::Subscriber,
    agent_id: AgentId,
    retries: std::collections::BTreeMap<AppName, tokio::sync::mpsc::Sender<()>>,
    shutdown: CancellationToken,
) {
    use fleetcast_events::v1::{AgentRemedy, RemedyAction};
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return,
            message = remedies.next() => match message {
                Some(m) => m,
                None => return,
            },
        };
        let remedy: AgentRemedy = match Encoding::Json.decode(&message.payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "a remedy that does not decode; ignored");
                continue;
            }
        };
        if remedy.agent_id != agent_id {
            tracing::warn!(to = %remedy.agent_id, "a remedy for another agent; ignored");
            continue;
        }
        match remedy.action {
            RemedyAction::Retry { app } => match retries.get(&app) {
                Some(retry) => {
                    tracing::info!(%app, reason = %remedy.reason, "the tracker asks to retry now");
                    // A retry already waiting is enough.
                    let _ = retry.try_send(());
                }
                None => {
                    tracing::warn!(%app, "the tracker asks to retry an app this agent does not run; ignored")
                }
            },
            RemedyAction::Restart if launched::launcher().is_some() => {
                tracing::warn!(reason = %remedy.reason, "the tracker asks this agent to restart; the launcher starts it again and it adopts the apps");
                launched::request_exit(launched::Exit::Restart);
            }
            RemedyAction::Restart => {
                tracing::warn!(reason = %remedy.reason, "the tracker asks this agent to restart, but it was not started by fleetcast-launcher: a restart would restart its apps; ignored")
            }
        }
    }
}

/// This trial agent has qualified: the launcher is told, and the soak begins.
fn qualified(
    launcher: &launched::Launcher,
    soaked: tokio::sync::oneshot::Sender<()>,
    soak: Duration,
) {
    match launcher.qualified() {
        Ok(()) => {
            tracing::info!(
                ?soak,
                "qualified: connected, state loaded, desired state read, heartbeat published; soaking"
            );
            tokio::spawn(async move {
                tokio::time::sleep(soak).await;
                let _ = soaked.send(());
            });
        }
        // The launcher's deadline then sends this agent back.
        Err(e) => tracing::error!(error = %e, "cannot tell the launcher this agent qualified"),
    }
}

/// A ticker of `period` whose first tick comes after a phase in `0..period` drawn from the
/// agent's id and `what`: agents started together (a fleet booted at once, or reconnected after
/// an outage) then spread their heartbeats and re-checks over the period instead of all
/// sending them in the same instant, which would delay the announcements that arrive then.
fn spread(agent_id: &str, what: &str, period: Duration) -> tokio::time::Interval {
    let hash = blake3::hash(format!("{agent_id}/{what}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&hash.as_bytes()[..8]);
    let nanos = period.as_nanos().max(1);
    let phase = Duration::from_nanos((u128::from(u64::from_le_bytes(bytes)) % nanos) as u64);
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + phase,
        period.max(Duration::from_millis(1)),
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

/// How long after a read made on (re)connecting it is made again: a read is served by any
/// replica of the bucket, and one that has not applied a write made while this agent was away
/// would hide it until the slow re-check.
const CONFIRM_READ_AFTER: Duration = Duration::from_secs(3);

/// Everything an app's loop waits on besides its desired state's announcements.
struct Signals {
    connections: watch::Receiver<u64>,
    /// The client is still there (not shutting down): reconnects are worth watching.
    client_alive: bool,
    /// When the read made on (re)connecting is made once more.
    confirm_at: Option<tokio::time::Instant>,
    /// The slow re-check of the stored value.
    ticker: tokio::time::Interval,
    /// A new root may accept what the old one refused.
    roots: watch::Receiver<u64>,
    /// What the app does between updates (a start refused, a start that works again) is
    /// reported; what it does during one, the update itself reports, so each update starts a
    /// fresh subscription.
    app_events: tokio::sync::broadcast::Receiver<supervisor::Event>,
    app_events_open: bool,
    nudges: Nudges,
}

/// What an app's loop does next.
enum Next {
    /// Apply this desired state (as received or read); `None`: nothing to apply this time.
    Desired(Option<Vec<u8>>),
    /// The announcements' subscription ended: make it again.
    Resubscribe,
    Shutdown,
}

impl Signals {
    /// Waits for the next thing to act on: an announcement, a reconnect, a re-check or retry
    /// that is due, the tracker's retry, a new root (each a desired state to apply, read from
    /// the store unless one waits), or the app's own events and this agent's soak (handled
    /// here).
    async fn next(
        &mut self,
        announcements: &mut async_nats::Subscriber,
        feed: &mut follow::DesiredFeed,
        retry: &mut follow::Retry,
        runner: &mut AppRunner,
        beat: &watch::Sender<updater::Snapshot>,
        shutdown: &CancellationToken,
    ) -> Next {
        let at = |instant: Option<tokio::time::Instant>| async move {
            tokio::time::sleep_until(instant.unwrap_or_else(tokio::time::Instant::now)).await
        };
        let desired = tokio::select! {
            _ = shutdown.cancelled() => return Next::Shutdown,
            message = announcements.next() => match message {
                Some(m) => feed.announced(&m),
                None => return Next::Resubscribe,
            },
            changed = self.connections.changed(), if self.client_alive => {
                // An error: the client is gone (shutting down); stop asking.
                self.client_alive = changed.is_ok();
                if !self.client_alive {
                    return Next::Desired(None);
                }
                self.confirm_at = Some(tokio::time::Instant::now() + CONFIRM_READ_AFTER);
                feed.read().await
            }
            _ = at(self.confirm_at), if self.confirm_at.is_some() => {
                self.confirm_at = None;
                feed.read().await
            }
            _ = self.ticker.tick() => feed.read().await,
            event = self.app_events.recv(), if self.app_events_open => {
                match event {
                    Ok(event) => runner.app_event(event).await,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => self.app_events_open = false,
                }
                let _ = beat.send(runner.snapshot());
                None
            }
            // The trial of this agent ran its soak: it becomes current.
            result = async { match self.nudges.soaked.as_mut() { Some(rx) => rx.await, None => std::future::pending().await } }, if self.nudges.soaked.is_some() => {
                self.nudges.soaked = None;
                if result.is_ok() {
                    runner.commit_trial().await;
                    let _ = beat.send(runner.snapshot());
                }
                None
            }
            // The tracker's remedy for a host stuck behind its ring.
            Some(()) = self.nudges.retry.recv() => match retry.take(true) {
                Some(waiting) => Some(waiting),
                None => feed.read().await,
            },
            Ok(()) = self.roots.changed() => feed.read().await,
            _ = at(retry.at()), if retry.at().is_some() => match retry.take(false) {
                Some(waiting) => Some(waiting),
                None => feed.read().await,
            },
        };
        Next::Desired(desired)
    }
}

/// One app: recover, then follow its desired-state key (announcements as they are written,
/// the stored value at start and after every reconnect, each read once more shortly after, and
/// on a slow re-check), applying what it says, and again as the retry plan says after an
/// update that could not finish.
async fn app_loop(
    mut runner: AppRunner,
    bus: AgentBus,
    ticker: tokio::time::Interval,
    roots: watch::Receiver<u64>,
    beat: watch::Sender<updater::Snapshot>,
    nudges: Nudges,
    shutdown: CancellationToken,
) {
    let mut feed = follow::DesiredFeed::new(bus.clone(), &runner.settings.name, runner.ring());
    let mut signals = Signals {
        connections: bus.connections.clone(),
        client_alive: true,
        confirm_at: None,
        ticker,
        roots,
        app_events: runner.app_events(),
        app_events_open: true,
        nudges,
    };
    if let Err(e) = runner.recover().await {
        tracing::error!(error = %e, "recovery failed");
    }
    let _ = beat.send(runner.snapshot());
    let mut retry = follow::Retry::default();
    'follow: while let Some(mut announcements) = feed.subscribe(&shutdown).await {
        signals.connections.mark_unchanged();
        // What was written while there was no subscription, read first.
        signals.confirm_at = Some(tokio::time::Instant::now() + CONFIRM_READ_AFTER);
        let mut desired = feed.read().await;
        loop {
            if feed.take_failed() {
                retry.soon(tokio::time::Instant::now());
            } else if runner.is_self() {
                launched::desired_read();
            }
            if let Some(bytes) = desired {
                if apply(&mut runner, &mut retry, &bytes).await {
                    // What the app did during the update, the update reported.
                    signals.app_events = runner.app_events();
                    // An update's buffers are free now; hand them back so an idle agent stays
                    // small.
                    fleetcast_runtime::memory::release_freed_soon();
                }
                let _ = beat.send(runner.snapshot());
            }
            let next = signals.next(
                &mut announcements,
                &mut feed,
                &mut retry,
                &mut runner,
                &beat,
                &shutdown,
            );
            desired = match next.await {
                Next::Desired(desired) => desired,
                Next::Resubscribe => continue 'follow,
                Next::Shutdown => break 'follow,
            };
        }
    }
    if launched::detaching() {
        runner.detach().await;
    } else {
        runner.stop().await;
    }
}

/// Applies the desired state `bytes` and puts its outcome in the retry plan; whether anything
/// was done (not a replay).
async fn apply(runner: &mut AppRunner, retry: &mut follow::Retry, bytes: &[u8]) -> bool {
    let desired: DesiredState = match Encoding::Json
        .decode(bytes)
        .or_else(|_| Encoding::MsgPack.decode(bytes))
    {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "desired state does not decode; ignored");
            return false;
        }
    };
    let outcome = runner.apply(&desired).await;
    let version = &desired.version;
    let (now, utc) = (tokio::time::Instant::now(), OffsetDateTime::now_utc());
    let wait = retry.applied(version, bytes, &outcome, now, utc);
    match &outcome {
        Ok(_) => {}
        Err(UpdateError::Refused(reason)) => {
            tracing::warn!(%version, %reason, "update refused");
            runner.refused(version, reason).await;
        }
        Err(UpdateError::NotNow(opens)) => {
            tracing::info!(%version, %opens, "staged; the switch waits");
        }
        Err(UpdateError::Transient(reason)) => {
            tracing::warn!(%version, %reason, retry_in = ?wait, "update failed, will retry");
        }
    }
    !matches!(outcome, Ok(Applied::AlreadyDone))
}
