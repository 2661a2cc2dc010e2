//! One app on this host: keeps it running (through the supervisor) and moves it to the desired
//! version: verify → assemble (nothing running is touched) → drain and stop → atomic switch →
//! start → health gate → commit, or roll back to the previous version and never retry the
//! failed one automatically. The journal is written before every disruptive step, and a
//! restarted agent first applies [`Journal::recovery`].

use std::sync::Arc;
use std::time::Duration;

use fleetcast_events::names::{agent_status_subject, slot_subject};
use fleetcast_events::v1::{
    AgentStatus, AppHeartbeat, AppState, DesiredState, LastUpdate, SlotReply, SlotRequest,
    UpdateBytes, UpdateOutcome,
};
use fleetcast_events::{AgentId, AppName, Encoding, RingName, VerifiedManifest};
use fleetcast_package::PackageConfigError;
use fleetcast_package::package_config::{self, Hook, Hooks, PackageConfig};
use fleetcast_runtime::{AgentBus, Trust};
use semver::Version;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::assemble::{AssembleError, NatsChunks};
use crate::fault;
use crate::health::{CommandError, GateFailure, run_gate};
use crate::install::InstallRoot;
use crate::isolation::RunAs;
use crate::journal::{Journal, JournalFile, Step};
use crate::release_tree::{InstalledTree, VerifyError, stage};
use crate::settings::{AppSettings, Settings};
use crate::sockets::Sockets;
use crate::supervisor::{ProcessSpec, StopPolicy, Supervisor};

/// Bounds on the slot service's "ask again after": neither a busy loop nor a forgotten host.
const SLOT_RETRY_MIN: Duration = Duration::from_millis(100);
const SLOT_RETRY_MAX: Duration = Duration::from_secs(600);

/// How one version runs (see [`AppRunner::launch`]).
struct Launch {
    spec: ProcessSpec,
    health: crate::health::HealthGate,
    hooks: Hooks,
}

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// Bad or hostile input: refused, the running app untouched. Not retried for this input.
    #[error("refused: {0}")]
    Refused(String),
    /// The store, network or disk failed: retried on the next signal or re-check.
    #[error("will retry: {0}")]
    Transient(String),
    /// Staged; the switch waits (update window, rollout slot) until this instant.
    #[error("staged; the switch waits until {0}")]
    NotNow(OffsetDateTime),
}

impl UpdateError {
    /// A staging failure, classified: the store, the network or a disk error that may pass is
    /// retried, and so is a chunk refused for not matching its name (the store may be
    /// repaired); a tree that cannot be installed, a file that does not match the manifest or
    /// a name this host's filesystem never takes is refused, for retrying it would leave the
    /// host "switching" for ever and its ring waiting.
    pub fn staging(e: AssembleError) -> UpdateError {
        match e {
            e if e.is_transient() => UpdateError::Transient(e.to_string()),
            AssembleError::Chunk(_) => {
                UpdateError::Transient(format!("{e} (the store may be repaired; will retry)"))
            }
            e => UpdateError::Refused(e.to_string()),
        }
    }

    /// A staged version that cannot run as configured (its `fleetcast.toml`, no command, its
    /// tree not kept): never installable, refused before anything running is touched.
    pub fn not_runnable(e: LaunchError) -> UpdateError {
        UpdateError::Refused(e.to_string())
    }

    /// A version already switched to or committed that cannot be started now (a rollback, a
    /// restart): retried, since what runs must be brought back.
    pub fn cannot_restart(version: &Version, e: LaunchError) -> UpdateError {
        UpdateError::Transient(format!("cannot run {version}: {e}"))
    }

    /// Not worth retrying for the same announcement: the version is refused for good.
    pub fn is_permanent(&self) -> bool {
        matches!(self, UpdateError::Refused(_))
    }
}

/// Why a version cannot run as configured (see [`AppRunner::launch`]).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{}: {source}", .path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} must be a regular file of at most {} bytes",
        package_config::FILE_NAME,
        package_config::MAX_SIZE
    )]
    NotAFile,
    #[error(transparent)]
    PackageConfig(#[from] PackageConfigError),
    #[error(
        "no command to run {app} {version}: neither the agent's config nor the package's {} names one",
        package_config::FILE_NAME
    )]
    NoCommand { app: AppName, version: Version },
    #[error("apps.listen: the agent could not listen on {listen:?} when it started (see its log)")]
    NotListening { listen: Vec<std::net::SocketAddr> },
    #[error(transparent)]
    Verify(#[from] VerifyError),
}

/// A package's hook (`pre-switch`, `post-switch`) failed: the version is refused.
#[derive(Debug, thiserror::Error)]
#[error("{hook} hook failed: {source}")]
pub struct HookError {
    hook: &'static str,
    source: CommandError,
}

/// The two phases of [`AppRunner::switch`], each journaled before it begins.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Stopping the running version, starting the new one.
    Switching,
    /// The new one runs, on probation until its health gate passes.
    HealthChecking,
}

/// Why a version just switched to is rolled back.
#[derive(Debug, thiserror::Error)]
enum Rejected {
    #[error(transparent)]
    Gate(#[from] GateFailure),
    #[error(transparent)]
    Hook(#[from] HookError),
}

/// What [`AppRunner::apply`] did with an announcement it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The version was already running (or refused before): a replay, nothing touched.
    AlreadyDone,
    /// The version was installed and switched to (or rolled back from, with its reason
    /// reported).
    Updated,
}

/// What one app's runner has done since the agent started (the agent's `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// The running version changed: updates, and rollbacks an operator ordered.
    pub updates: u64,
    /// Updates the agent rolled back by itself (health gate or post-switch hook failed).
    pub rollbacks: u64,
}

/// One app's heartbeat value with its counts: what the app loop hands to the heartbeat loop
/// and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub beat: AppHeartbeat,
    pub counts: Counts,
    /// The highest version accepted from a signed announcement (freshness compares it with
    /// the signer's timestamp).
    pub accepted: Option<Version>,
    /// Since when the running version has been up: a snapshot is taken when the app's state
    /// changes, so each heartbeat computes its uptime afresh (see [`Snapshot::beat_at`]).
    pub running_since: Option<Instant>,
}

impl Snapshot {
    /// The app's heartbeat as of `now`: its uptime counted to `now`, not to the snapshot.
    pub fn beat_at(&self, now: Instant) -> AppHeartbeat {
        let mut beat = self.beat.clone();
        beat.uptime_s = self
            .running_since
            .map_or(0, |since| now.saturating_duration_since(since).as_secs());
        beat
    }

    /// An app the agent could not set up (see `isolated` in the agent's loop): failed, nothing
    /// running, staged or accepted.
    pub fn failed(app: &AppName) -> Snapshot {
        Snapshot {
            beat: AppHeartbeat {
                app: app.clone(),
                state: AppState::Failed,
                running: None,
                staged: None,
                previous: None,
                uptime_s: 0,
                // Not an update's outcome: the reason is in the app's status.
                last_update: None,
            },
            counts: Counts::default(),
            accepted: None,
            running_since: None,
        }
    }
}

pub struct AppRunner {
    pub settings: AppSettings,
    /// The agent's own settings (id, ring, limits, windows).
    host: Arc<Settings>,
    /// The agent's id (`host.agent_id`, checked).
    agent_id: AgentId,
    windows: Vec<fleetcast_runtime::window::Window>,
    root: InstallRoot,
    journal_file: JournalFile,
    journal: Journal,
    supervisor: Supervisor,
    trust: Arc<Trust>,
    bus: AgentBus,
    /// Bytes fetched from the store for the update in progress (or the last one).
    fetched_bytes: u64,
    /// What staging the current update's version cost, for its outcome report.
    update_bytes: Option<(Version, UpdateBytes)>,
    state: AppState,
    running_since: Option<Instant>,
    counts: Counts,
    /// The user the app, its hooks and health command run as (`apps.user`), resolved at start.
    run_as: Option<RunAs>,
    /// Its own writable folder (`FLEETCAST_DATA_DIR`), owned by that user.
    app_data: std::path::PathBuf,
    /// How the last update ended, repeated in every heartbeat so that a status lost on the
    /// way still reaches the rollout.
    last_update: Option<LastUpdate>,
    /// The listening sockets the agent holds for the app across its versions (`apps.listen`).
    sockets: Option<Arc<Sockets>>,
    /// This is the agent's own release ([`crate::settings::SelfUpdate::app`]) under the
    /// launcher: a switch is a trial of the new agent, not a process to start.
    is_self: bool,
}

impl AppRunner {
    pub fn new(
        settings: AppSettings,
        host: Arc<Settings>,
        trust: Arc<Trust>,
        bus: AgentBus,
    ) -> Result<AppRunner, UpdateError> {
        let app_dir = host.data_dir.join("apps").join(&settings.name);
        let run_as = match &settings.user {
            Some(user) => Some(
                RunAs::resolve(user, settings.group.as_deref())
                    .map_err(|e| UpdateError::Refused(format!("apps.user: {e}")))?,
            ),
            None if settings.group.is_some() => {
                return Err(UpdateError::Refused(
                    "apps.group is set without apps.user".into(),
                ));
            }
            None => None,
        };
        let root = InstallRoot::new(&app_dir)
            .map_err(|e| UpdateError::Transient(format!("{}: {e}", app_dir.display())))?;
        let app_data = crate::isolation::prepare_app_data(&app_dir, run_as).map_err(|e| {
            UpdateError::Refused(format!(
                "the app's data folder {}: {e}",
                app_dir.join("data").display()
            ))
        })?;
        let (journal_file, journal) = JournalFile::open(&app_dir)
            .map_err(|e| UpdateError::Refused(format!("journal unreadable: {e}")))?;
        let windows = host
            .windows()
            .map_err(|e| UpdateError::Refused(e.to_string()))?;
        let agent_id = host.id().map_err(|e| UpdateError::Refused(e.to_string()))?;
        let stop = StopPolicy {
            grace: settings.grace,
            ..Default::default()
        };
        let supervisor = Supervisor::with_pid_file(
            &settings.name,
            settings.crash.clone(),
            stop,
            Some(app_dir.join("app.pid")),
        );
        let is_self = settings.name == crate::settings::SelfUpdate::app()
            && crate::launched::launcher().is_some();
        Ok(AppRunner {
            settings,
            host,
            agent_id,
            windows,
            root,
            journal_file,
            journal,
            supervisor,
            trust,
            bus,
            fetched_bytes: 0,
            update_bytes: None,
            state: AppState::Stopped,
            running_since: None,
            counts: Counts::default(),
            run_as,
            app_data,
            last_update: None,
            sockets: None,
            is_self,
        })
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The app's installed versions (what a failed update must have left untouched).
    pub fn install_root(&self) -> &InstallRoot {
        &self.root
    }

    fn save(&mut self) -> Result<(), UpdateError> {
        self.journal_file
            .save(&self.journal)
            .map_err(|e| UpdateError::Transient(format!("journal: {e}")))
    }

    /// How `version` runs: the agent's config for this app, with the package's own
    /// `fleetcast.toml` (verified with the rest of the version) over it.
    fn launch(&self, version: &Version) -> Result<Launch, LaunchError> {
        let dir = self.root.version_dir(version);
        let file = dir.join(package_config::FILE_NAME);
        let unreadable = |source| LaunchError::Read {
            path: file.clone(),
            source,
        };
        let package = match std::fs::symlink_metadata(&file) {
            Ok(meta) if meta.is_file() && meta.len() <= package_config::MAX_SIZE => {
                let text = std::fs::read_to_string(&file).map_err(unreadable)?;
                PackageConfig::parse(&text)?
            }
            Ok(_) => return Err(LaunchError::NotAFile),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => PackageConfig::default(),
            Err(e) => return Err(unreadable(e)),
        };
        let command = package
            .command
            .unwrap_or_else(|| self.settings.command.clone());
        let Some((program, args)) = command.split_first() else {
            return Err(LaunchError::NoCommand {
                app: self.settings.name.clone(),
                version: version.clone(),
            });
        };
        if !self.settings.listen.is_empty() && self.sockets.is_none() {
            return Err(LaunchError::NotListening {
                listen: self.settings.listen.clone(),
            });
        }
        let verify = if self.settings.verify_on_start {
            Some(Arc::new(InstalledTree::load(&self.root, version)?))
        } else {
            None
        };
        // The package's environment is a default; the host's config wins.
        let mut env = package.env;
        env.extend(self.settings.env.clone());
        env.insert(
            crate::isolation::DATA_DIR_ENV.into(),
            self.app_data.display().to_string(),
        );
        Ok(Launch {
            spec: ProcessSpec {
                program: crate::supervisor::program_path(program, &dir),
                args: args.to_vec(),
                env,
                cwd: dir,
                run_as: self.run_as,
                verify,
                sockets: self.sockets.clone(),
            },
            health: package
                .health
                .unwrap_or_else(|| self.settings.health.clone()),
            hooks: package.hooks,
        })
    }

    /// Asks the rollout's slot service for leave to switch. Refused: ask again when it says.
    /// Nobody answers (no tracker yet, tracker down, timeout): wait and ask again after
    /// `slot_retry`, never switch without a slot, because the rollout asked for a limit and a
    /// silent service must not turn into the whole fleet switching at once. The version stays
    /// staged meanwhile, so the switch is quick once a slot is granted.
    async fn request_slot(&mut self, target: &Version) -> Result<(), UpdateError> {
        let request = SlotRequest {
            agent_id: self.agent_id.clone(),
            app: self.settings.name.clone(),
            ring: self.host.ring.clone(),
            version: target.clone(),
        };
        let answer: Result<SlotReply, _> = self
            .bus
            .request_event(
                &slot_subject(&self.settings.name, &self.agent_id),
                &request,
                Encoding::Json,
            )
            .await;
        let (wait, reason) = match answer {
            Ok(reply) if reply.granted => {
                tracing::info!(version = %target, "rollout slot granted");
                return Ok(());
            }
            Ok(reply) => (
                Duration::from_millis(reply.retry_after_ms).clamp(SLOT_RETRY_MIN, SLOT_RETRY_MAX),
                reply.reason.unwrap_or_else(|| "no slot free".into()),
            ),
            Err(e) => (self.host.slot_retry, e.to_string()),
        };
        tracing::info!(version = %target, %reason, retry_in = ?wait, "waiting for a rollout slot");
        self.report(AppState::WaitingForSlot, Some(target.clone()), Some(reason))
            .await;
        Err(UpdateError::NotNow(
            OffsetDateTime::now_utc() + time::Duration::try_from(wait).unwrap_or_default(),
        ))
    }

    /// Runs one of the package's hooks for `target`, with the app's environment plus what a
    /// migration needs to know.
    async fn run_hook(
        &self,
        name: &'static str,
        hook: &Hook,
        launch: &Launch,
        target: &Version,
        from: Option<&Version>,
    ) -> Result<(), HookError> {
        let mut env = launch.spec.env.clone();
        env.insert("FLEETCAST_APP".into(), self.settings.name.to_string());
        env.insert("FLEETCAST_VERSION".into(), target.to_string());
        if let Some(from) = from {
            env.insert("FLEETCAST_FROM_VERSION".into(), from.to_string());
        }
        tracing::info!(version = %target, hook = name, "running hook");
        crate::health::run_command(
            &hook.command,
            &launch.spec.cwd,
            &env,
            self.run_as,
            hook.timeout,
        )
        .await
        .map_err(|source| HookError { hook: name, source })
    }

    /// Switches `current` to `version` if needed and starts it; `launch` when the caller has
    /// already read how it runs (the switch, where every millisecond is downtime).
    async fn run_version(
        &mut self,
        version: &Version,
        launch: Option<&Launch>,
    ) -> Result<(), UpdateError> {
        if self.root.current().as_ref() != Some(version) {
            self.root
                .switch_to(version)
                .map_err(|e| UpdateError::Transient(format!("switch to {version}: {e}")))?;
            let rolling_back = matches!(self.journal.step, Step::RollingBack { .. });
            fault::hit(if rolling_back {
                "rollback-switched"
            } else {
                "switched"
            });
        }
        let spec = match launch {
            Some(launch) => launch.spec.clone(),
            None => {
                self.launch(version)
                    .map_err(|e| UpdateError::cannot_restart(version, e))?
                    .spec
            }
        };
        self.supervisor.start(spec).await;
        self.running_since = Some(Instant::now());
        Ok(())
    }

    /// First thing after (re)start: finish or revert what the journal says was in progress,
    /// then run the committed version: under the launcher, by adopting the process the previous
    /// agent left running when it runs that version (see [`AppRunner::adoptable`]).
    pub async fn recover(&mut self) -> Result<(), UpdateError> {
        if self.is_self {
            return self.recover_self().await;
        }
        let pid_file = self.root.root().join("app.pid");
        let recovery = self.journal.recovery();
        if !self.settings.listen.is_empty() && self.sockets.is_none() {
            self.sockets = self.held_sockets();
        }
        let adoption = match self.adoptable(&pid_file, &recovery) {
            Ok(adoption) => Some(adoption),
            Err(why) => {
                if let Some(why) = why {
                    tracing::warn!(reason = %why, "restarting the app the previous agent left running instead of adopting it");
                }
                // A previous agent killed mid-flight may have left the app running.
                crate::supervisor::reap_orphan(
                    &pid_file,
                    nix::sys::signal::Signal::SIGTERM,
                    self.settings.grace,
                )
                .await;
                None
            }
        };
        // Only now: an app a killed agent left running held the sockets until it was stopped.
        self.listen_for_app();
        if self.journal.step != Step::Idle {
            tracing::warn!(step = ?self.journal.step, "recovering an interrupted update");
        }
        let rolled_back = recovery.refuse.clone();
        if let Some(refused) = recovery.refuse {
            // A rollback the killed agent had begun and this one finishes: counted here, as
            // the killed one never got to.
            self.counts.rollbacks += 1;
            self.journal.refused.insert(refused);
        }
        self.journal.step = Step::Idle;
        self.journal.committed = recovery.run.clone();
        self.save()?;
        if let Some(version) = recovery.run {
            match adoption {
                Some((adoption, spec)) => {
                    let age = crate::supervisor::age(adoption.pid).unwrap_or_default();
                    self.supervisor.adopt(adoption, spec).await;
                    self.running_since = Instant::now().checked_sub(age).or(Some(Instant::now()));
                }
                None => self.run_version(&version, None).await?,
            }
            self.report(AppState::Running, Some(version), None).await;
        }
        // The killed agent never reported that rollback: the heartbeats say it.
        if let Some((version, reason)) = rolled_back {
            self.last_update = Some(LastUpdate {
                version,
                outcome: UpdateOutcome::RolledBack,
                reason: Some(reason),
                at: OffsetDateTime::now_utc(),
                // Not known any more: a restarted agent does not remember.
                bytes: None,
            });
        }
        Ok(())
    }

    /// Binds the app's `apps.listen` sockets when nothing holds them yet, and gives them to
    /// the launcher to keep across agents. A socket that cannot be bound is logged: every
    /// start then fails with the reason (see `launch`).
    fn listen_for_app(&mut self) {
        if self.settings.listen.is_empty() || self.sockets.is_some() {
            return;
        }
        match Sockets::bind(&self.settings.listen) {
            Ok(sockets) => {
                tracing::info!(addrs = ?sockets.addrs(), "listening for the app");
                for (i, fd) in sockets.fds().enumerate() {
                    crate::launched::store(
                        &crate::launched::socket_name(&self.settings.name, i),
                        fd,
                    );
                }
                self.sockets = Some(Arc::new(sockets));
            }
            Err(e) => {
                tracing::error!(error = %e, "apps.listen: cannot listen for the app")
            }
        }
    }

    /// The agent's own release after a restart: this agent may be the trial of a new release
    /// (it qualifies, then commits after its soak, see `commit_trial`), the promoted one whose
    /// predecessor exited before it recorded so, or the previous agent the launcher went back
    /// to after a trial failed: that one refuses the release and reports the rollback with the
    /// launcher's reason.
    async fn recover_self(&mut self) -> Result<(), UpdateError> {
        let Some(launcher) = crate::launched::launcher() else {
            return Ok(());
        };
        let failure = launcher.take_trial_failure().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the launcher's record of a failed trial is unreadable");
            None
        });
        let running = launcher.release().and_then(|r| Version::parse(r).ok());
        match self.journal.step.clone() {
            Step::Switching { from, target } | Step::HealthChecking { from, target }
                if running.as_ref() == Some(&target) =>
            {
                if launcher.is_trial() {
                    tracing::info!(version = %target, "this agent is on trial: it qualifies, then becomes current after its soak");
                    self.journal.step = Step::HealthChecking {
                        from,
                        target: target.clone(),
                    };
                    self.save()?;
                    self.report(AppState::HealthChecking, Some(target), None)
                        .await;
                } else {
                    self.commit_self(from, target).await?;
                }
            }
            Step::Switching { target, .. } | Step::HealthChecking { target, .. } => {
                let reason = failure
                    .filter(|f| f.version == target.to_string())
                    .map(|f| f.reason)
                    .unwrap_or_else(|| {
                        format!(
                            "the new agent did not become current; the launcher runs {}",
                            running.map_or("the installed agent".into(), |v| v.to_string())
                        )
                    });
                tracing::error!(version = %target, %reason, "agent upgrade rolled back");
                self.rolled_back(target, reason).await?;
            }
            _ => {
                self.journal.step = Step::Idle;
                self.save()?;
                if let Some(version) = self.journal.committed.clone() {
                    self.report(AppState::Running, Some(version), None).await;
                }
            }
        }
        Ok(())
    }

    /// Hands over to `target`, staged: the launcher is told to run it on trial and this agent
    /// exits, leaving its apps running for the new one to adopt.
    async fn switch_self(&mut self, target: Version) -> Result<(), UpdateError> {
        let Some(launcher) = crate::launched::launcher() else {
            return Err(UpdateError::Refused(
                "this agent was not started by fleetcast-launcher: update it by hand".into(),
            ));
        };
        let path = self
            .root
            .version_dir(&target)
            .join(crate::settings::SelfUpdate::BINARY);
        if !path.is_file() {
            let reason = format!(
                "the release holds no {}",
                crate::settings::SelfUpdate::BINARY
            );
            self.journal.refused.insert((target, reason.clone()));
            self.journal.step = Step::Idle;
            self.save()?;
            return Err(UpdateError::Refused(reason));
        }
        let from = self.journal.committed.clone();
        self.journal.step = Step::Switching {
            from,
            target: target.clone(),
        };
        self.save()?;
        self.report(AppState::Switching, Some(target.clone()), None)
            .await;
        let trial = crate::launched::Trial {
            version: target.to_string(),
            path,
            qualify: self.host.self_update.qualify,
            soak: self.host.self_update.soak,
        };
        if let Err(e) = launcher.begin_trial(&trial) {
            self.journal.step = Step::Idle;
            self.save()?;
            return Err(UpdateError::Transient(format!(
                "the launcher's trial file: {e}"
            )));
        }
        fault::hit("trial-written");
        tracing::warn!(version = %target, "handing over to the new agent on trial; the apps keep running");
        crate::launched::request_exit(crate::launched::Exit::RunTrial);
        Ok(())
    }

    /// The trial agent after its soak: it becomes current (the launcher first: a crash after
    /// that and before the journal is written is finished by `recover_self`).
    pub async fn commit_trial(&mut self) {
        let Step::HealthChecking { from, target } = self.journal.step.clone() else {
            return;
        };
        let Some(launcher) = crate::launched::launcher() else {
            return;
        };
        if let Err(e) = launcher.promote() {
            let reason = format!("the new agent cannot become current: {e}");
            tracing::error!(version = %target, %reason, "exiting; the launcher goes back to the previous agent");
            crate::launched::request_exit(crate::launched::Exit::Detach);
            return;
        }
        fault::hit("promoted");
        if let Err(e) = self.commit_self(from, target).await {
            tracing::error!(error = %e, "the agent's journal is not updated");
        }
    }

    async fn commit_self(
        &mut self,
        from: Option<Version>,
        target: Version,
    ) -> Result<(), UpdateError> {
        self.journal.previous = from.clone();
        self.journal.committed = Some(target.clone());
        self.journal.step = Step::Idle;
        self.save()?;
        tracing::info!(version = %target, "this agent is current");
        self.committed(from, target).await;
        Ok(())
    }

    /// After `target`'s commit is on disk: counted (when it changed the version), versions
    /// beyond `keep_versions` pruned (never it or `from`), reported running.
    async fn committed(&mut self, from: Option<Version>, target: Version) {
        if from.as_ref() != Some(&target) {
            self.counts.updates += 1;
        }
        let mut protect = vec![target.clone()];
        protect.extend(from);
        if let Err(e) = self.root.prune(self.host.keep_versions, &protect) {
            tracing::warn!(error = %e, "old versions not pruned");
        }
        self.report(AppState::Running, Some(target), None).await;
    }

    /// The ring this host is in (whose desired state it follows).
    pub fn ring(&self) -> &RingName {
        &self.host.ring
    }

    pub fn is_self(&self) -> bool {
        self.is_self
    }

    /// The listening sockets a previous agent bound for the app, from the launcher: binding
    /// again would fail while the launcher (or the running app) holds them.
    fn held_sockets(&self) -> Option<Arc<Sockets>> {
        let app = &self.settings.name;
        let held: Vec<_> = (0..self.settings.listen.len())
            .map_while(|i| crate::launched::take(&crate::launched::socket_name(app, i)))
            .collect();
        if held.is_empty() {
            return None;
        }
        match Sockets::from_held(&self.settings.listen, held) {
            Ok(sockets) => {
                tracing::info!(addrs = ?sockets.addrs(), "listening for the app on the sockets the launcher kept");
                Some(Arc::new(sockets))
            }
            Err(e) => {
                tracing::warn!(error = %e, "the sockets the launcher kept are not the configured ones; listening anew");
                None
            }
        }
    }

    /// The process the previous agent left running, to adopt instead of starting the app
    /// again: only under the launcher (which kept its output pipes), when no update was in
    /// flight and it runs the version to run. `Err(None)`: nothing to adopt; `Err(Some(why))`:
    /// a process runs that cannot be adopted (it is restarted, and the log says why).
    fn adoptable(
        &self,
        pid_file: &std::path::Path,
        recovery: &crate::journal::Recovery,
    ) -> Result<(crate::supervisor::Adoption, ProcessSpec), Option<String>> {
        if crate::launched::launcher().is_none() {
            return Err(None);
        }
        let crate::supervisor::Recorded { pid, cwd, .. } =
            crate::supervisor::recorded(pid_file).ok_or(None)?;
        let app = &self.settings.name;
        if !matches!(self.journal.step, Step::Idle | Step::Staging { .. }) {
            return Err(Some(format!(
                "an update was interrupted ({:?}): the version to run is started afresh",
                self.journal.step
            )));
        }
        let version = recovery
            .run
            .as_ref()
            .ok_or_else(|| Some("no version is committed".to_string()))?;
        if cwd != self.root.version_dir(version) {
            return Err(Some(format!(
                "it runs from {}, not {version}",
                cwd.display()
            )));
        }
        let pipes = (
            crate::launched::take(&crate::launched::stdout_name(app)),
            crate::launched::take(&crate::launched::stderr_name(app)),
        );
        let (Some(stdout), Some(stderr)) = pipes else {
            return Err(Some("the launcher did not keep its output pipes".into()));
        };
        let spec = self.launch(version).map_err(|e| Some(e.to_string()))?.spec;
        Ok((
            crate::supervisor::Adoption {
                pid,
                stdout,
                stderr,
            },
            spec,
        ))
    }

    /// Brings the app to `desired`. Idempotent: a replayed or repeated announcement is a no-op.
    pub async fn apply(&mut self, desired: &DesiredState) -> Result<Applied, UpdateError> {
        let now = OffsetDateTime::now_utc();
        let manifest = self
            .trust
            .keys(now)
            .and_then(|keys| desired.manifest.verify(&keys, self.trust.expiry_clock(now)))
            .map_err(|e| UpdateError::Refused(format!("manifest: {e}")))?;
        if manifest.app != self.settings.name || manifest.version != desired.version {
            return Err(UpdateError::Refused(format!(
                "signed manifest is for {} {}, the announcement for {} {}",
                manifest.app, manifest.version, self.settings.name, desired.version
            )));
        }
        let target = manifest.version.clone();
        if self.journal.committed.as_ref() == Some(&target) || self.journal.is_refused(&target) {
            return Ok(Applied::AlreadyDone);
        }
        // This agent is the trial of `target`: it becomes current after its soak.
        if self.is_self
            && matches!(&self.journal.step, Step::HealthChecking { target: t, .. } if *t == target)
        {
            return Ok(Applied::AlreadyDone);
        }
        if let Some(highest) = self.journal.highest_accepted.clone()
            && target < highest
        {
            self.accept_rollback(&manifest, &highest)?;
        }
        if self
            .journal
            .highest_accepted
            .as_ref()
            .is_none_or(|h| target > *h)
        {
            self.journal.highest_accepted = Some(target.clone());
        }
        self.fetched_bytes = 0;
        self.update_bytes = None;
        self.journal.step = Step::Staging {
            target: target.clone(),
        };
        // Reported first, so the fleet hears of the reaction without waiting for the disk; the
        // acceptance (highest version, withdrawn versions) is then on disk before anything is
        // fetched: a restart mid-download does not forget it and take a replayed older version.
        self.report(AppState::Downloading, Some(target.clone()), None)
            .await;
        fault::hit("downloading");
        self.save()?;
        fault::hit("staging-journaled");
        let prepared = self.prepare(&manifest, desired).await;
        match &prepared {
            Err(UpdateError::Refused(_)) => {
                // Nothing running was touched; the journal says so again.
                self.journal.step = Step::Idle;
                self.save()?;
            }
            // The store or network failed (a slow store times out every fetch): nothing
            // running was touched and the update is retried, but say so and why, or the host
            // reads as downloading for as long as the store keeps failing.
            Err(e @ UpdateError::Transient(_)) => {
                self.report(AppState::Failed, Some(target.clone()), Some(e.to_string()))
                    .await;
            }
            _ => {}
        }
        let launch = prepared?;
        self.switch(target, launch).await?;
        Ok(Applied::Updated)
    }

    /// An announcement older than the highest version accepted: only a signed rollback
    /// directive covering that version moves the app back. It withdraws the versions it
    /// replaces for good (a replayed announcement of one of them is refused); once a version
    /// above it was accepted, the directive itself is a replay and refused.
    fn accept_rollback(
        &mut self,
        manifest: &VerifiedManifest,
        highest: &Version,
    ) -> Result<(), UpdateError> {
        let target = &manifest.version;
        let Some(from) = &manifest.rollback_from else {
            return Err(UpdateError::Refused(format!(
                "{target} is older than {highest}, already accepted (replayed announcement?)"
            )));
        };
        if from < highest || from <= target {
            return Err(UpdateError::Refused(format!(
                "rollback directive to {target} covers versions up to {from}, but {highest} was accepted since (replayed directive?)"
            )));
        }
        tracing::warn!(version = %target, replaces_up_to = %from, "signed rollback directive accepted");
        let reason = format!("withdrawn by a signed rollback to {target}");
        let withdrawn = [
            self.journal.committed.clone(),
            Some(highest.clone()),
            Some(from.clone()),
        ];
        for version in withdrawn.into_iter().flatten() {
            if version > *target && version <= *from {
                self.journal.refused.insert((version, reason.clone()));
            }
        }
        self.journal.highest_accepted = Some(from.clone());
        Ok(())
    }

    /// Everything before the disruptive step: stage the version, check how it runs, wait for
    /// the window and, if the rollout asks, a slot; run the package's pre-switch hook. A
    /// failing hook refuses the version for good (like a failed health gate), with the app
    /// still on the old version.
    async fn prepare(
        &mut self,
        manifest: &VerifiedManifest,
        desired: &DesiredState,
    ) -> Result<Launch, UpdateError> {
        let target = manifest.version.clone();
        // What the announcement itself weighed, as the tracker writes it (JSON).
        let announcement = Encoding::Json.encode(desired).map_or(0, |b| b.len() as u64);
        self.stage(manifest, announcement).await?;
        fault::hit("staged");
        let launch = self.launch(&target).map_err(UpdateError::not_runnable)?;
        let now = OffsetDateTime::now_utc();
        if !fleetcast_runtime::window::allows(&self.windows, now) {
            self.report(AppState::WaitingForWindow, Some(target.clone()), None)
                .await;
            return Err(UpdateError::NotNow(fleetcast_runtime::window::next_open(
                &self.windows,
                now,
            )));
        }
        if desired.slot {
            self.request_slot(&target).await?;
        }
        if let Some(hook) = &launch.hooks.pre_switch {
            let from = self.journal.committed.clone();
            if let Err(failed) = self
                .run_hook("pre-switch", hook, &launch, &target, from.as_ref())
                .await
            {
                let reason = failed.to_string();
                self.journal.refused.insert((target, reason.clone()));
                return Err(UpdateError::Refused(reason));
            }
            fault::hit("pre-switch-done");
        }
        Ok(launch)
    }

    async fn stage(
        &mut self,
        manifest: &VerifiedManifest,
        announcement: u64,
    ) -> Result<(), UpdateError> {
        // The rest of the fleet is still taking the announcement (see the setting): no fetch
        // before this.
        let fetch_from = tokio::time::Instant::now() + self.host.fetch_delay;
        let store = NatsChunks {
            chunks: self.bus.chunks.clone(),
            app: self.settings.name.clone(),
        };
        let staged = stage(
            &self.root,
            manifest,
            &store,
            self.host.concurrency,
            fetch_from,
        )
        .await
        .map_err(UpdateError::staging)?;
        tracing::info!(version = %manifest.version, ?staged, "version staged");
        // What this update took from the store: the tree nodes, the patch list, chunks and
        // patches (the signed manifest came with the announcement).
        self.fetched_bytes = staged.fetched_bytes();
        let bytes = UpdateBytes {
            fetched: announcement + staged.fetched_bytes(),
            metadata: announcement + staged.metadata_bytes(),
            chunks: staged.files.fetched_bytes - staged.files.patch_bytes,
            patches: staged.files.patch_bytes,
            release: manifest.tree.bytes,
        };
        self.update_bytes = Some((manifest.version.clone(), bytes));
        Ok(())
    }

    /// Journals `phase` of the switch from `from` to `target` (on disk before any of it is
    /// done, then its fault point) and reports it.
    async fn begin(
        &mut self,
        phase: Phase,
        from: &Option<Version>,
        target: &Version,
    ) -> Result<(), UpdateError> {
        let reported = Some(target.clone());
        let (from, target) = (from.clone(), target.clone());
        let (step, state, journaled) = match phase {
            Phase::Switching => (
                Step::Switching { from, target },
                AppState::Switching,
                "switching-journaled",
            ),
            Phase::HealthChecking => (
                Step::HealthChecking { from, target },
                AppState::HealthChecking,
                "health-journaled",
            ),
        };
        self.journal.step = step;
        self.save()?;
        fault::hit(journaled);
        self.report(state, reported, None).await;
        Ok(())
    }

    /// The disruptive part: stop, switch, start, gate; commit or roll back.
    async fn switch(&mut self, target: Version, launch: Launch) -> Result<(), UpdateError> {
        if self.is_self {
            return self.switch_self(target).await;
        }
        let from = self.journal.committed.clone();
        self.begin(Phase::Switching, &from, &target).await?;
        let mut events = self.supervisor.subscribe();
        self.supervisor.stop().await;
        fault::hit("old-stopped");
        self.run_version(&target, Some(&launch)).await?;
        fault::hit("new-started");
        self.begin(Phase::HealthChecking, &from, &target).await?;
        let mut verdict = run_gate(
            &launch.health,
            &mut events,
            &launch.spec.cwd,
            &launch.spec.env,
            self.run_as,
        )
        .await
        .map_err(Rejected::from);
        if let (Ok(()), Some(hook)) = (&verdict, &launch.hooks.post_switch) {
            verdict = self
                .run_hook("post-switch", hook, &launch, &target, from.as_ref())
                .await
                .map_err(Rejected::from);
        }
        match verdict {
            Ok(()) => {
                fault::hit("gate-passed");
                self.journal.previous = from.clone();
                self.journal.committed = Some(target.clone());
                self.journal.step = Step::Idle;
                self.save()?;
                fault::hit("committed");
                self.committed(from, target).await;
                Ok(())
            }
            Err(rejected) => {
                let reason = rejected.to_string();
                tracing::warn!(version = %target, %reason, "health gate failed, rolling back");
                self.journal.step = Step::RollingBack {
                    from: from.clone(),
                    target: target.clone(),
                    reason: reason.clone(),
                };
                self.save()?;
                fault::hit("rollback-journaled");
                self.supervisor.stop().await;
                fault::hit("rollback-stopped");
                if let Some(from) = &from {
                    self.run_version(from, None).await?;
                }
                fault::hit("rollback-started");
                self.rolled_back(target, reason).await
            }
        }
    }

    /// `target` is back out: refused for good with `reason`, counted and reported.
    async fn rolled_back(&mut self, target: Version, reason: String) -> Result<(), UpdateError> {
        self.journal
            .refused
            .insert((target.clone(), reason.clone()));
        self.journal.step = Step::Idle;
        self.save()?;
        self.counts.rollbacks += 1;
        self.report(AppState::RolledBack, Some(target), Some(reason))
            .await;
        Ok(())
    }

    async fn report(&mut self, state: AppState, version: Option<Version>, reason: Option<String>) {
        self.state = state;
        let outcome = match state {
            AppState::Running => Some(UpdateOutcome::Committed),
            AppState::RolledBack => Some(UpdateOutcome::RolledBack),
            AppState::Failed => Some(UpdateOutcome::Failed),
            AppState::Refused => Some(UpdateOutcome::Refused),
            _ => None,
        };
        if let (Some(outcome), Some(version)) = (outcome, &version) {
            self.last_update = Some(LastUpdate {
                version: version.clone(),
                outcome,
                reason: reason.clone(),
                at: OffsetDateTime::now_utc(),
                bytes: self
                    .update_bytes
                    .as_ref()
                    .filter(|(v, _)| v == version)
                    .map(|(_, b)| *b),
            });
        }
        self.publish_status(state, version, reason).await;
    }

    /// The app's supervisor events outside an update (see [`AppRunner::app_events`]).
    pub fn app_events(&self) -> tokio::sync::broadcast::Receiver<crate::supervisor::Event> {
        self.supervisor.subscribe()
    }

    /// The app outside an update: a start that failed (a program that cannot be run, or a
    /// version folder changed since install under `verify_on_start`) is reported as `failed`
    /// with the reason, and the next start that works as `running` again. The last update's
    /// outcome stays as it was: no update happened.
    pub async fn app_event(&mut self, event: crate::supervisor::Event) {
        use crate::supervisor::Event;
        let version = self.journal.committed.clone();
        match event {
            Event::SpawnFailed { reason } => {
                self.state = AppState::Failed;
                self.publish_status(AppState::Failed, version, Some(reason))
                    .await;
            }
            Event::Started { .. } if self.state == AppState::Failed => {
                self.state = AppState::Running;
                self.publish_status(AppState::Running, version, None).await;
            }
            _ => {}
        }
    }

    async fn publish_status(
        &mut self,
        state: AppState,
        version: Option<Version>,
        reason: Option<String>,
    ) {
        let status = AgentStatus {
            agent_id: self.agent_id.clone(),
            app: self.settings.name.clone(),
            state,
            version,
            progress_bytes: Some(self.fetched_bytes),
            reason,
            at: OffsetDateTime::now_utc(),
        };
        let subject = agent_status_subject(&self.agent_id, &self.host.ring, &self.settings.name);
        if let Err(e) = self
            .bus
            .report_event(&subject, &status, Encoding::MsgPack)
            .await
        {
            tracing::warn!(error = %e, "status not published");
        }
    }

    /// Reports a refused announcement; what runs is unchanged.
    pub async fn refused(&mut self, version: &Version, reason: &str) {
        let state = self.state;
        self.report(
            AppState::Refused,
            Some(version.clone()),
            Some(reason.to_string()),
        )
        .await;
        self.state = state;
    }

    pub fn heartbeat(&self) -> AppHeartbeat {
        let staged = match &self.journal.step {
            Step::Staging { target }
            | Step::Switching { target, .. }
            | Step::HealthChecking { target, .. } => Some(target.clone()),
            _ => None,
        };
        AppHeartbeat {
            app: self.settings.name.clone(),
            state: self.state,
            running: self.journal.committed.clone(),
            staged,
            previous: self.journal.previous.clone(),
            uptime_s: self.running_since.map_or(0, |t| t.elapsed().as_secs()),
            last_update: self.last_update.clone(),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            beat: self.heartbeat(),
            counts: self.counts,
            accepted: self.journal.highest_accepted.clone(),
            running_since: self.running_since,
        }
    }

    pub async fn stop(&mut self) {
        self.supervisor.stop().await;
    }

    /// Lets go of the app without stopping it: the next agent adopts it. What the launcher
    /// keeps is given to it again (a launcher started since this agent has none of it).
    pub async fn detach(&mut self) {
        if let Some(sockets) = &self.sockets {
            for (i, fd) in sockets.fds().enumerate() {
                crate::launched::store(&crate::launched::socket_name(&self.settings.name, i), fd);
            }
        }
        self.supervisor.detach().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The retry decision of each staging failure: what the store, the network or a passing
    /// disk error caused is retried; what the same package meets on every attempt is refused.
    #[test]
    fn staging_failures_are_retried_or_refused_by_their_cause() {
        let io = |errno| AssembleError::Io {
            path: "versions/2.0.0.partial/x".into(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        let retried = [
            AssembleError::Fetch {
                id: "ab".into(),
                reason: "timed out".into(),
            },
            io(libc::ENOSPC),
            io(libc::EIO),
            AssembleError::Chunk(fleetcast_package::ChunkError::Hash { id: "ab".into() }),
        ];
        for e in retried {
            let what = e.to_string();
            let classified = UpdateError::staging(e);
            assert!(
                matches!(&classified, UpdateError::Transient(r) if r.starts_with(&what)),
                "{what}: {classified:?}"
            );
            assert!(!classified.is_permanent());
        }
        let refused = [
            AssembleError::BadTree("a node does not decode".into()),
            AssembleError::FileMismatch("bin/run".into()),
            io(libc::ENAMETOOLONG),
            io(libc::EILSEQ),
        ];
        for e in refused {
            let what = e.to_string();
            let classified = UpdateError::staging(e);
            assert!(
                matches!(&classified, UpdateError::Refused(r) if *r == what),
                "{what}: {classified:?}"
            );
            assert!(classified.is_permanent());
        }
    }

    /// A version that cannot run as configured is never installable before the switch, and
    /// retried when it is the one to bring back.
    #[test]
    fn a_version_that_cannot_run_is_refused_before_the_switch_and_retried_after() {
        let no_command = || LaunchError::NoCommand {
            app: AppName::from_static("web"),
            version: Version::new(2, 0, 0),
        };
        let before = UpdateError::not_runnable(no_command());
        assert!(before.is_permanent(), "{before:?}");
        assert!(
            before.to_string().contains("no command to run web 2.0.0"),
            "{before}"
        );
        let after = UpdateError::cannot_restart(&Version::new(2, 0, 0), no_command());
        assert!(!after.is_permanent(), "{after:?}");
        assert!(
            after
                .to_string()
                .starts_with("will retry: cannot run 2.0.0"),
            "{after}"
        );
        assert!(!UpdateError::NotNow(OffsetDateTime::now_utc()).is_permanent());
    }

    /// A snapshot is taken when the app's state changes; each heartbeat counts the uptime to
    /// its own time, so it grows between two heartbeats (it used to stay at the value of the
    /// last change, ~2 s after an update, for ever).
    #[test]
    fn uptime_grows_between_two_heartbeats() {
        let since = Instant::now();
        let mut snapshot = Snapshot::failed(&AppName::from_static("web"));
        snapshot.running_since = Some(since);
        let first = snapshot.beat_at(since + Duration::from_secs(2));
        let second = snapshot.beat_at(since + Duration::from_secs(17));
        assert_eq!((first.uptime_s, second.uptime_s), (2, 17));
        snapshot.running_since = None;
        assert_eq!(
            snapshot.beat_at(since + Duration::from_secs(30)).uptime_s,
            0
        );
    }
}
