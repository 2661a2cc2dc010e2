//! The rollout state machine: a pure function of (policy, fleet, now) and what happened to this
//! rollout so far. The service around it only applies its effects (write a ring's desired
//! state, announce a halt) and persists it, so a restarted tracker continues where it was.
//!
//! A rollout moves ring by ring. A ring's hosts get the desired state asking for a rollout
//! slot; the slots (at most `parallel` at a time) pace the switches. The ring completes when
//! every live host of it reported the new version running (or failed, below the threshold);
//! after its soak the next ring starts. Failures at or over the threshold halt the rollout with
//! the reasons, and later rings never receive the version. Stale hosts are not waited for.

use std::collections::BTreeMap;
use std::time::Duration;

use fleetcast_events::v1::{AgentStatus, AppState, LastUpdate, SlotReply, SlotRequest};
use fleetcast_events::{AgentId, AppName, RingName, Selector};
// The wire's words for a slot and a ring's counts: the state machine keeps them as they are
// shown. Its phase is its own ([`Phase`]), named on the wire by `tracker::Phase`.
use fleetcast_events::tracker::{self, RolloutSummary};
pub use fleetcast_events::tracker::{Lease, RingProgress};
use semver::Version;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::fleet::{AgentView, Fleet};
use crate::policy::{Amount, AppPolicy, Approval, RingPolicy};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub app: AppName,
    pub version: Version,
    /// Saved as the flat fields `phase`, `paused`, `ring_completed` and `reason` (see
    /// [`PhaseRecord`]), as rollouts always were.
    #[serde(flatten)]
    pub phase: Phase,
    /// Index in the policy's rings of the ring being rolled out.
    pub ring: usize,
    #[serde(with = "time::serde::rfc3339")]
    pub ring_started: OffsetDateTime,
    /// Hosts holding a slot, with their lease's end (a host that dies frees its slot).
    pub slots: BTreeMap<AgentId, Lease>,
    /// Hosts that rolled this version back or refused it, with the reason.
    pub failures: BTreeMap<AgentId, String>,
    /// A rollback: the signer's directive (the earlier version's manifest re-signed), which
    /// the desired states carry instead of the release's own manifest.
    #[serde(default)]
    pub directive: Option<fleetcast_events::SignedManifest>,
    /// A rollback of one ring only.
    #[serde(default)]
    pub only_ring: Option<RingName>,
    /// Only hosts whose labels match are this rollout's (`approve --where role=web`): they are
    /// what it counts, paces and waits for; the others keep what they run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Selector>,
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// Versions whose rollouts ended without completing because this one (or one it replaced)
    /// took their place: a newer release, or a rollback. `rollout watch --version` of one of
    /// them then ends instead of waiting for ever. The last [`SUPERSEDED_KEPT`].
    #[serde(default)]
    pub superseded: Vec<Version>,
    /// Its hosts by state over time (the rollout page's plot), saved with it so a restart
    /// keeps it; absent from rollouts saved before (`/api/rollouts/{app}/timeline` serves it,
    /// [`Rollout::summary`] leaves it out of the other views).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<crate::timeline::Sample>,
}

pub const SUPERSEDED_KEPT: usize = 20;

/// Where a rollout is, with what only that phase has: a pause and a ring's soak belong to a
/// rollout still going, a reason to one that stopped. (The wire names the phase only, as
/// [`tracker::Phase`], beside loose `paused`, `ring_completed` and `reason`.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "PhaseRecord", into = "PhaseRecord")]
pub enum Phase {
    /// Hosts of the first ring may download; nobody switches before `approve`. A pause asked
    /// for meanwhile holds after the approval.
    AwaitingApproval { paused: bool },
    Running {
        /// No new slots while paused (hosts already switching finish).
        paused: bool,
        /// When the current ring completed; the next starts after its soak.
        ring_completed: Option<OffsetDateTime>,
    },
    /// Stopped by its failure threshold; the reason says which hosts failed and why.
    Halted { reason: String },
    /// Every ring completed.
    Completed,
    /// Stopped by an operator.
    Aborted { reason: String },
}

impl Phase {
    /// Running from its current ring's start: not paused, the ring not completed yet.
    pub const RUNNING: Phase = Phase::Running {
        paused: false,
        ring_completed: None,
    };

    /// The phase's name, as the API shows it.
    pub fn kind(&self) -> tracker::Phase {
        match self {
            Phase::AwaitingApproval { .. } => tracker::Phase::AwaitingApproval,
            Phase::Running { .. } => tracker::Phase::Running,
            Phase::Halted { .. } => tracker::Phase::Halted,
            Phase::Completed => tracker::Phase::Completed,
            Phase::Aborted { .. } => tracker::Phase::Aborted,
        }
    }

    /// Still moving: waiting for approval or running (a pause included).
    pub fn is_active(&self) -> bool {
        matches!(self, Phase::AwaitingApproval { .. } | Phase::Running { .. })
    }

    /// Halted or aborted: ended before it completed, so no later ring may get its version.
    pub fn is_stopped(&self) -> bool {
        matches!(self, Phase::Halted { .. } | Phase::Aborted { .. })
    }

    pub fn is_paused(&self) -> bool {
        match self {
            Phase::AwaitingApproval { paused } | Phase::Running { paused, .. } => *paused,
            Phase::Halted { .. } | Phase::Completed | Phase::Aborted { .. } => false,
        }
    }

    /// When the current ring completed, while its soak runs.
    pub fn ring_completed(&self) -> Option<OffsetDateTime> {
        match self {
            Phase::Running { ring_completed, .. } => *ring_completed,
            _ => None,
        }
    }

    /// Why it halted or was aborted.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Phase::Halted { reason } | Phase::Aborted { reason } => Some(reason),
            _ => None,
        }
    }
}

/// A [`Phase`] as the rollouts bucket holds it: the flat fields every rollout was saved with
/// (and a tracker of an earlier version reads), flattened into the rollout's record.
#[derive(Serialize, Deserialize)]
struct PhaseRecord {
    phase: tracker::Phase,
    paused: bool,
    #[serde(with = "time::serde::rfc3339::option")]
    ring_completed: Option<OffsetDateTime>,
    reason: Option<String>,
}

impl From<PhaseRecord> for Phase {
    /// What a record of an ended rollout holds beside its reason (a pause, a soak's start)
    /// no longer means anything, and is dropped.
    fn from(record: PhaseRecord) -> Phase {
        let PhaseRecord {
            phase,
            paused,
            ring_completed,
            reason,
        } = record;
        match phase {
            tracker::Phase::AwaitingApproval => Phase::AwaitingApproval { paused },
            tracker::Phase::Running => Phase::Running {
                paused,
                ring_completed,
            },
            tracker::Phase::Halted => Phase::Halted {
                reason: reason.unwrap_or_default(),
            },
            tracker::Phase::Completed => Phase::Completed,
            tracker::Phase::Aborted => Phase::Aborted {
                reason: reason.unwrap_or_default(),
            },
        }
    }
}

impl From<Phase> for PhaseRecord {
    fn from(phase: Phase) -> PhaseRecord {
        PhaseRecord {
            phase: phase.kind(),
            paused: phase.is_paused(),
            ring_completed: phase.ring_completed(),
            reason: phase.reason().map(str::to_string),
        }
    }
}

/// Why an operator's steering command was refused by the rollout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SteerError {
    /// Approval is for a rollout waiting for it (a running one is approved already).
    #[error("cannot approve a rollout that is {0:?}")]
    CannotApprove(tracker::Phase),
    /// A rollout that ended can be neither paused nor resumed.
    #[error("the rollout is {0:?}")]
    Ended(tracker::Phase),
    /// The command names another version than the one rolling out.
    #[error("{app} is rolling out {rolling_out}, not {asked}")]
    OtherVersion {
        app: AppName,
        rolling_out: Version,
        asked: Version,
    },
    /// Hosts are switching already: which hosts a running rollout is for is settled.
    #[error("{app} is rolling out to {} already; which hosts it is for cannot change now", hosts(.target))]
    TargetFixed {
        app: AppName,
        target: Option<Selector>,
    },
}

/// The hosts a rollout with `target` is for, in words.
fn hosts(target: &Option<Selector>) -> String {
    target
        .as_ref()
        .map_or("every host".to_string(), |t| format!("the hosts where {t}"))
}

/// What the service must do after a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Write this ring's desired state: this version, slots required.
    Desire {
        ring: RingName,
    },
    Halted {
        reason: String,
    },
    Completed,
}

/// The knobs of the tracker that the state machine needs.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub stale_after: Duration,
    pub slot_lease: Duration,
}

impl Rollout {
    /// A rollout for a stored release. The first ring's hosts get the desired state at once
    /// (download early), even while the rollout waits for approval.
    pub fn start(
        app: &AppName,
        version: Version,
        policy: &AppPolicy,
        now: OffsetDateTime,
    ) -> (Rollout, Vec<Effect>) {
        let rollout = Rollout {
            app: app.clone(),
            version,
            phase: match policy.approval {
                Approval::Auto => Phase::RUNNING,
                Approval::Manual => Phase::AwaitingApproval { paused: false },
            },
            ring: 0,
            ring_started: now,
            slots: BTreeMap::new(),
            failures: BTreeMap::new(),
            directive: None,
            only_ring: None,
            target: None,
            created: now,
            superseded: Vec::new(),
            timeline: Vec::new(),
        };
        let effects = policy
            .rings
            .first()
            .map(|r| Effect::Desire {
                ring: r.name.clone(),
            })
            .into_iter()
            .collect();
        (rollout, effects)
    }

    /// A rollback to `to` through the signer's `directive`: no approval (it answers an
    /// incident), otherwise paced like a release by `policy` (the one ring's, for a ring).
    pub fn start_rollback(
        app: &AppName,
        to: Version,
        directive: fleetcast_events::SignedManifest,
        only_ring: Option<RingName>,
        policy: &AppPolicy,
        now: OffsetDateTime,
    ) -> (Rollout, Vec<Effect>) {
        let (mut rollout, effects) = Rollout::start(app, to, policy, now);
        rollout.phase = Phase::RUNNING;
        rollout.directive = Some(directive);
        rollout.only_ring = only_ring;
        (rollout, effects)
    }

    /// Takes the place of `previous` (the app's rollout until now): it, if it had not ended,
    /// and what it superseded are superseded now.
    pub fn replacing(&mut self, previous: Option<&Rollout>) {
        let Some(previous) = previous else { return };
        self.superseded.clone_from(&previous.superseded);
        if previous.is_active() && previous.version != self.version {
            self.mark_superseded(previous.version.clone());
        }
    }

    /// `version` will not be rolled out (a release stored after a newer one started).
    pub fn mark_superseded(&mut self, version: Version) {
        if !self.superseded.contains(&version) {
            self.superseded.push(version);
        }
        let excess = self.superseded.len().saturating_sub(SUPERSEDED_KEPT);
        self.superseded.drain(..excess);
    }

    /// The rollout as the views (`/api/rollouts`, the CLI, the dashboard every 2 s) show it:
    /// without its timeline, which is served apart.
    /// As the API shows it, with `rings`, its progress per ring ([`Rollout::progress`]).
    pub fn summary(&self, rings: Vec<RingProgress>) -> RolloutSummary {
        RolloutSummary {
            app: self.app.clone(),
            version: self.version.clone(),
            phase: self.phase.kind(),
            paused: self.phase.is_paused(),
            ring: self.ring,
            ring_started: self.ring_started,
            ring_completed: self.phase.ring_completed(),
            slots: self.slots.clone(),
            failures: self.failures.clone(),
            reason: self.phase.reason().map(str::to_string),
            rollback: self.directive.is_some(),
            only_ring: self.only_ring.clone(),
            target: self.target.clone(),
            created: self.created,
            superseded: self.superseded.clone(),
            rings,
        }
    }

    pub fn is_active(&self) -> bool {
        self.phase.is_active()
    }

    /// Whether `agent` is one of this rollout's hosts: all are, unless it has a target.
    pub fn targets(&self, agent: &AgentView) -> bool {
        self.target
            .as_ref()
            .is_none_or(|target| target.matches(&agent.labels))
    }

    /// Lets a rollout waiting for approval run (`asked`: the version the operator approves,
    /// when they name one), on the hosts `target` selects if one is given; its first ring
    /// starts now. Approving a running rollout again changes nothing, so a target cannot be
    /// set (or widened) once hosts have switched under another.
    pub fn approve(
        &mut self,
        asked: Option<&Version>,
        target: Option<&Selector>,
        now: OffsetDateTime,
    ) -> Result<(), SteerError> {
        if let Some(asked) = asked.filter(|v| **v != self.version) {
            return Err(SteerError::OtherVersion {
                app: self.app.clone(),
                rolling_out: self.version.clone(),
                asked: asked.clone(),
            });
        }
        match self.phase {
            Phase::AwaitingApproval { paused } => {
                self.phase = Phase::Running {
                    paused,
                    ring_completed: None,
                };
                self.ring_started = now;
                self.target = target.cloned();
                Ok(())
            }
            Phase::Running { .. } if target.is_none() || target == self.target.as_ref() => Ok(()),
            Phase::Running { .. } => Err(SteerError::TargetFixed {
                app: self.app.clone(),
                target: self.target.clone(),
            }),
            ref ended => Err(SteerError::CannotApprove(ended.kind())),
        }
    }

    pub fn set_paused(&mut self, paused: bool) -> Result<(), SteerError> {
        match &mut self.phase {
            Phase::AwaitingApproval { paused: now } | Phase::Running { paused: now, .. } => {
                *now = paused;
                Ok(())
            }
            ended => Err(SteerError::Ended(ended.kind())),
        }
    }

    pub fn abort(&mut self, reason: String) {
        if self.is_active() {
            self.phase = Phase::Aborted { reason };
            self.slots.clear();
        }
    }

    /// An agent's status: a result for this version frees its slot, a failure is recorded.
    /// Whether the rollout changed (a status repeated changes nothing).
    pub fn record_status(&mut self, status: &AgentStatus) -> bool {
        if status.app != self.app {
            return false;
        }
        self.record(
            &status.agent_id,
            status.version.as_ref(),
            status.state,
            status.reason.as_deref(),
        )
    }

    /// An agent's last update outcome of this app as its heartbeat repeats it: folded as the
    /// status it repeats would be, so that a lost status still counts (idempotent).
    pub fn record_outcome(&mut self, agent_id: &AgentId, update: &LastUpdate) -> bool {
        self.record(
            agent_id,
            Some(&update.version),
            update.outcome.state(),
            update.reason.as_deref(),
        )
    }

    fn record(
        &mut self,
        agent_id: &AgentId,
        version: Option<&Version>,
        state: AppState,
        reason: Option<&str>,
    ) -> bool {
        if version != Some(&self.version) {
            return false;
        }
        match state {
            AppState::Running => self.slots.remove(agent_id).is_some(),
            AppState::RolledBack | AppState::Refused => {
                let freed = self.slots.remove(agent_id).is_some();
                let reason = reason.unwrap_or("no reason given");
                if self.failures.get(agent_id).map(String::as_str) == Some(reason) {
                    return freed;
                }
                self.failures.insert(agent_id.clone(), reason.to_string());
                true
            }
            _ => false,
        }
    }

    /// Counts per ring, in policy order.
    pub fn progress(
        &self,
        policy: &AppPolicy,
        fleet: &Fleet,
        now: OffsetDateTime,
        timing: Timing,
    ) -> Vec<RingProgress> {
        policy
            .rings
            .iter()
            .map(|ring| {
                let mut p = RingProgress::new(ring.name.clone());
                for agent in fleet
                    .agents
                    .values()
                    .filter(|a| a.ring == ring.name && self.targets(a))
                {
                    let Some(app) = agent.apps.get(&self.app) else {
                        continue;
                    };
                    if agent.is_stale(now, timing.stale_after) {
                        p.stale += 1;
                        continue;
                    }
                    p.targets += 1;
                    if app.running.as_ref() == Some(&self.version) {
                        p.done += 1;
                    } else if self.failures.contains_key(&agent.agent_id) {
                        p.failed += 1;
                    } else if self.slots.contains_key(&agent.agent_id) {
                        p.switching += 1;
                    }
                }
                p
            })
            .collect()
    }

    /// Live agents of `ring` that run this app (the targets [`Rollout::progress`] counts): what
    /// a percentage of the ring is of.
    fn ring_targets(
        &self,
        ring: &str,
        fleet: &Fleet,
        now: OffsetDateTime,
        timing: Timing,
    ) -> usize {
        fleet
            .agents
            .values()
            .filter(|a| {
                a.ring == ring
                    && self.targets(a)
                    && a.apps.contains_key(&self.app)
                    && !a.is_stale(now, timing.stale_after)
            })
            .count()
    }

    /// Moves the rollout on: frees finished and expired slots, halts on the failure
    /// threshold, completes rings, starts the next after its soak.
    pub fn tick(
        &mut self,
        policy: &AppPolicy,
        fleet: &Fleet,
        now: OffsetDateTime,
        timing: Timing,
    ) -> Vec<Effect> {
        self.slots.retain(|agent, lease| {
            let done = fleet
                .agents
                .get(agent)
                .and_then(|a| a.apps.get(&self.app))
                .is_some_and(|app| app.running.as_ref() == Some(&self.version));
            lease.until > now && !done
        });
        let mut effects = Vec::new();
        // Chained: an empty ring with no soak completes at once and the next one starts.
        while let Phase::Running {
            paused: false,
            ring_completed,
        } = self.phase
        {
            let Some(ring) = policy.rings.get(self.ring) else {
                break;
            };
            let progress = self.progress(policy, fleet, now, timing);
            let Some(p) = progress.get(self.ring) else {
                break;
            };
            if let Some(reason) = self.failed_too_often(ring, p, fleet) {
                self.phase = Phase::Halted {
                    reason: reason.clone(),
                };
                self.slots.clear();
                effects.push(Effect::Halted { reason });
                break;
            }
            if p.done + p.failed < p.targets {
                break;
            }
            let completed = ring_completed.unwrap_or(now);
            self.phase = Phase::Running {
                paused: false,
                ring_completed: Some(completed),
            };
            if now < completed + ring.soak {
                break;
            }
            match policy.rings.get(self.ring + 1) {
                Some(next) => {
                    self.ring += 1;
                    self.ring_started = now;
                    self.phase = Phase::RUNNING;
                    effects.push(Effect::Desire {
                        ring: next.name.clone(),
                    });
                }
                None => {
                    self.phase = Phase::Completed;
                    effects.push(Effect::Completed);
                }
            }
        }
        effects
    }

    /// Why `ring` halts the rollout, with its progress `p`: its failures reached the
    /// threshold once enough of its hosts reported (`None`: they did not).
    fn failed_too_often(
        &self,
        ring: &RingPolicy,
        p: &RingProgress,
        fleet: &Fleet,
    ) -> Option<String> {
        let threshold = ring.max_failures.of(p.targets).max(1);
        if p.failed < threshold || p.done + p.failed < ring.min_results {
            return None;
        }
        let reasons: Vec<String> = self
            .failures
            .iter()
            .filter(|(agent, _)| {
                fleet
                    .agents
                    .get(*agent)
                    .is_some_and(|a| a.ring == ring.name)
            })
            .map(|(agent, why)| format!("{agent}: {why}"))
            .collect();
        Some(format!(
            "ring {}: {} of {} hosts failed (threshold {threshold}): {}",
            ring.name,
            p.failed,
            p.targets,
            reasons.join("; ")
        ))
    }

    /// An agent asks to switch. Granted while its ring is the one rolling out (or done), the
    /// rollout runs, the ring's window is open and a slot is free; the slot is then its own
    /// for `timing.slot_lease` (asking again renews it).
    pub fn request_slot(
        &mut self,
        policy: &AppPolicy,
        fleet: &Fleet,
        request: &SlotRequest,
        now: OffsetDateTime,
        timing: Timing,
    ) -> SlotReply {
        // A host outside the rollout's target hears so first: nothing else will let it switch.
        let decided = self
            .is_target(&request.agent_id, fleet)
            .and_then(|()| self.may_switch(policy, request))
            .and_then(|slot| match slot {
                Slot::Unpaced => Ok(None),
                Slot::Paced { index, ring } => {
                    window_open(ring, now)?;
                    self.slot_free(index, ring, &request.agent_id, fleet, now, timing)?;
                    Ok(Some(ring))
                }
            });
        match decided {
            Ok(paced) => {
                if let Some(ring) = paced {
                    self.lease(&request.agent_id, &ring.name, now + timing.slot_lease);
                }
                SlotReply {
                    granted: true,
                    retry_after_ms: 0,
                    reason: None,
                }
            }
            Err(no) => SlotReply {
                granted: false,
                retry_after_ms: no.retry.as_millis() as u64,
                reason: Some(no.reason),
            },
        }
    }

    /// Whether the rollout lets the request's host switch at all: its version, its ring
    /// started, the rollout running.
    fn may_switch<'p>(
        &self,
        policy: &'p AppPolicy,
        request: &SlotRequest,
    ) -> Result<Slot<'p>, NoSlot> {
        if request.version != self.version {
            return Err(NoSlot::after(
                30,
                format!(
                    "{} is rolling out {}, not {}",
                    self.app, self.version, request.version
                ),
            ));
        }
        let Some((index, ring)) = policy
            .rings
            .iter()
            .enumerate()
            .find(|(_, r)| r.name == request.ring)
        else {
            return Err(NoSlot::after(
                60,
                format!("ring {} is not in the policy of {}", request.ring, self.app),
            ));
        };
        match &self.phase {
            Phase::Completed => return Ok(Slot::Unpaced),
            Phase::Halted { reason } | Phase::Aborted { reason } => {
                let phase = self.phase.kind();
                return Err(NoSlot::after(60, format!("rollout {phase:?}: {reason}")));
            }
            Phase::AwaitingApproval { .. } => {
                return Err(NoSlot::after(
                    5,
                    format!(
                        "waiting for approval (fleetcast approve {} {})",
                        self.app, self.version
                    ),
                ));
            }
            Phase::Running { paused: true, .. } => {
                return Err(NoSlot::after(5, "rollout paused".into()));
            }
            Phase::Running { paused: false, .. } => {}
        }
        if index > self.ring {
            return Err(NoSlot::after(
                10,
                format!("ring {} has not started", request.ring),
            ));
        }
        Ok(Slot::Paced { index, ring })
    }

    /// Whether the asking agent is one of this rollout's hosts. One the tracker has not heard
    /// from yet cannot be judged by its labels, so a targeted rollout makes it ask again.
    fn is_target(&self, agent: &AgentId, fleet: &Fleet) -> Result<(), NoSlot> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        match fleet.agents.get(agent) {
            Some(view) if self.targets(view) => Ok(()),
            Some(_) => Err(NoSlot::after(
                60,
                format!("not a host of this rollout (it is for the hosts where {target})"),
            )),
            None => Err(NoSlot::after(
                5,
                format!("labels not known yet (this rollout is for the hosts where {target})"),
            )),
        }
    }

    /// Whether `agent` may hold a slot of `ring` (at `index` in the policy): one it holds
    /// already, any in a ring done before, one of the current ring's `parallel` if one is free.
    fn slot_free(
        &self,
        index: usize,
        ring: &RingPolicy,
        agent: &AgentId,
        fleet: &Fleet,
        now: OffsetDateTime,
        timing: Timing,
    ) -> Result<(), NoSlot> {
        if index != self.ring || self.slots.contains_key(agent) {
            return Ok(());
        }
        // Only a percentage needs the ring's size, counted over the fleet: done for every
        // request of a 1,000-agent ring it was most of the tracker's work.
        let limit = match ring.parallel {
            Amount::Count(n) => n.max(1),
            Amount::Percent(100) => usize::MAX,
            Amount::Percent(_) => ring
                .parallel
                .of(self.ring_targets(&ring.name, fleet, now, timing))
                .max(1),
        };
        let taken = self.slots.values().filter(|l| l.ring == ring.name).count();
        if taken >= limit {
            return Err(NoSlot::after(
                1,
                format!("ring {}: {taken} of {limit} slots taken", ring.name),
            ));
        }
        Ok(())
    }

    /// Gives `agent` a slot of `ring` until `until`, or extends the one it holds.
    fn lease(&mut self, agent: &AgentId, ring: &RingName, until: OffsetDateTime) {
        self.slots
            .entry(agent.clone())
            .and_modify(|lease| lease.until = until)
            .or_insert_with(|| Lease {
                ring: ring.clone(),
                until,
            });
    }
}

/// What a slot request gets when nothing refuses it.
enum Slot<'p> {
    /// The rollout completed: a host that comes late switches at once, unpaced.
    Unpaced,
    /// One of the slots of `ring`, at `index` in the policy.
    Paced { index: usize, ring: &'p RingPolicy },
}

/// Why a host may not switch now, and when it should ask again.
struct NoSlot {
    retry: Duration,
    reason: String,
}

impl NoSlot {
    fn after(retry_s: u64, reason: String) -> NoSlot {
        NoSlot {
            retry: Duration::from_secs(retry_s),
            reason,
        }
    }
}

/// Whether `ring`'s maintenance windows let its hosts switch `now` (else until when not).
/// Windows were checked as the settings were read: one that does not parse is none.
fn window_open(ring: &RingPolicy, now: OffsetDateTime) -> Result<(), NoSlot> {
    let windows = ring.windows().unwrap_or_default();
    if fleetcast_runtime::window::allows(&windows, now) {
        return Ok(());
    }
    let opens = fleetcast_runtime::window::next_open(&windows, now);
    Err(NoSlot {
        retry: Duration::try_from(opens - now).unwrap_or(Duration::from_secs(60)),
        reason: format!(
            "ring {} is outside its maintenance window until {opens}",
            ring.name
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::AgentView;
    use crate::policy::{Amount, RingPolicy};
    use fleetcast_events::tracker::AppSummary;

    const TIMING: Timing = Timing {
        stale_after: Duration::from_secs(60),
        slot_lease: Duration::from_secs(600),
    };

    fn v(s: &str) -> Version {
        Version::parse(s).expect("version")
    }

    fn t0() -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000) + time::Duration::hours(12)
    }

    fn ring(name: &str, parallel: Amount, soak_s: u64) -> RingPolicy {
        RingPolicy {
            name: RingName::try_from(name).expect("name"),
            parallel,
            soak: Duration::from_secs(soak_s),
            max_failures: Amount::Count(2),
            min_results: 1,
            windows: vec![],
        }
    }

    fn policy() -> AppPolicy {
        AppPolicy {
            approval: Approval::Auto,
            rings: vec![
                ring("canary", Amount::Count(1), 30),
                ring("broad", Amount::Percent(50), 0),
            ],
        }
    }

    #[test]
    fn a_rollout_replaced_before_it_ended_is_superseded_and_remembered() {
        let policy = policy();
        let (mut v2, _) = Rollout::start(&AppName::from_static("demo"), v("2.0.0"), &policy, t0());
        let (mut v3, _) = Rollout::start(&AppName::from_static("demo"), v("3.0.0"), &policy, t0());
        v3.replacing(Some(&v2));
        assert_eq!(v3.superseded, vec![v("2.0.0")]);
        // A rollback replacing v3 keeps the list and adds v3.
        let (mut back, _) =
            Rollout::start(&AppName::from_static("demo"), v("1.0.0"), &policy, t0());
        back.replacing(Some(&v3));
        assert_eq!(back.superseded, vec![v("2.0.0"), v("3.0.0")]);
        // A rollout that had ended (completed, halted, aborted) was not superseded.
        v2.phase = Phase::Completed;
        let (mut v4, _) = Rollout::start(&AppName::from_static("demo"), v("4.0.0"), &policy, t0());
        v4.replacing(Some(&v2));
        assert!(v4.superseded.is_empty());
        // Bounded.
        for minor in 0..(SUPERSEDED_KEPT as u64 + 5) {
            v4.mark_superseded(Version::new(3, minor, 0));
        }
        assert_eq!(v4.superseded.len(), SUPERSEDED_KEPT);
        assert_eq!(v4.superseded.last(), Some(&Version::new(3, 24, 0)));
    }

    /// One canary host and four broad hosts, all on 1.0.0, seen at `t0`.
    fn fleet() -> Fleet {
        let mut fleet = Fleet::default();
        for (id, ring) in [
            ("c1", "canary"),
            ("b1", "broad"),
            ("b2", "broad"),
            ("b3", "broad"),
            ("b4", "broad"),
        ] {
            fleet.agents.insert(
                AgentId::try_from(id).expect("name"),
                AgentView {
                    agent_id: AgentId::try_from(id).expect("name"),
                    host: id.into(),
                    ring: RingName::try_from(ring).expect("name"),
                    labels: BTreeMap::new(),
                    metadata: None,
                    agent_version: None,
                    apps: BTreeMap::from([(
                        AppName::from_static("demo"),
                        AppSummary {
                            running: Some(v("1.0.0")),
                            uptime_s: 1,
                            ..AppSummary::new(AppState::Running)
                        },
                    )]),
                    last_seen: t0(),
                },
            );
        }
        fleet
    }

    fn ask(r: &mut Rollout, fleet: &Fleet, agent: &str, now: OffsetDateTime) -> SlotReply {
        let ring = fleet.agents[agent].ring.clone();
        r.request_slot(
            &policy(),
            fleet,
            &SlotRequest {
                agent_id: AgentId::try_from(agent).expect("name"),
                app: AppName::from_static("demo"),
                ring,
                version: v("2.0.0"),
            },
            now,
            TIMING,
        )
    }

    /// `reply` refuses the slot, saying `why`.
    fn assert_refused(reply: &SlotReply, why: &str) {
        assert!(!reply.granted, "{reply:?}");
        let reason = reply.reason.as_deref().unwrap_or_default();
        assert!(reason.contains(why), "{reason:?} does not say {why:?}");
    }

    fn switched(fleet: &mut Fleet, r: &mut Rollout, agent: &str) {
        let status = AgentStatus {
            agent_id: AgentId::try_from(agent).expect("name"),
            app: AppName::from_static("demo"),
            state: AppState::Running,
            version: Some(v("2.0.0")),
            progress_bytes: None,
            reason: None,
            at: t0(),
        };
        fleet.status(&status, &fleet.agents[agent].ring.clone(), t0());
        r.record_status(&status);
    }

    fn failed(r: &mut Rollout, agent: &str, why: &str) {
        r.record_status(&AgentStatus {
            agent_id: AgentId::try_from(agent).expect("name"),
            app: AppName::from_static("demo"),
            state: AppState::RolledBack,
            version: Some(v("2.0.0")),
            progress_bytes: None,
            reason: Some(why.into()),
            at: t0(),
        });
    }

    /// A rollout approved for the hosts where `role=web` counts, paces and waits for those
    /// only: the others are refused a slot (even once it completed), are not laggards, and
    /// the target cannot change while it runs.
    #[test]
    fn a_targeted_rollout_is_for_the_matching_hosts_only() {
        let (mut p, mut fleet, now) = (policy(), fleet(), t0());
        p.approval = Approval::Manual;
        for id in ["c1", "b1", "b2"] {
            let agent = fleet.agents.get_mut(id).expect("agent");
            agent.labels.insert("role".into(), "web".into());
        }
        let web: Selector = "role=web".parse().expect("selector");
        let (mut r, _) = Rollout::start(&AppName::from_static("demo"), v("2.0.0"), &p, now);
        r.approve(None, Some(&web), now).expect("approve");
        assert_eq!(r.summary(Vec::new()).target, Some(web.clone()));
        let targets: Vec<usize> = r
            .progress(&p, &fleet, now, TIMING)
            .iter()
            .map(|g| g.targets)
            .collect();
        assert_eq!(targets, vec![1, 2], "b3 and b4 are not web hosts");
        assert_refused(
            &ask(&mut r, &fleet, "b3", now),
            "for the hosts where role=web",
        );
        assert!(ask(&mut r, &fleet, "c1", now).granted);
        assert_eq!(
            r.approve(None, Some(&"role=db".parse().expect("selector")), now),
            Err(SteerError::TargetFixed {
                app: AppName::from_static("demo"),
                target: Some(web.clone()),
            })
        );
        r.approve(None, Some(&web), now)
            .expect("the same target again changes nothing");
        switched(&mut fleet, &mut r, "c1");
        r.tick(&p, &fleet, now, TIMING);
        let later = now + time::Duration::seconds(31);
        r.tick(&p, &fleet, later, TIMING);
        assert_eq!(r.ring, 1, "the canary ring completed with its one web host");
        // 50% of the broad ring's two web hosts: one slot.
        assert!(ask(&mut r, &fleet, "b1", later).granted);
        assert_refused(&ask(&mut r, &fleet, "b2", later), "slots taken");
        switched(&mut fleet, &mut r, "b1");
        assert!(ask(&mut r, &fleet, "b2", later).granted);
        let stalled = crate::laggards::laggards(&r, &p, &fleet, later, TIMING, Duration::ZERO);
        let ids: Vec<&str> = stalled.iter().map(|l| l.agent_id.as_str()).collect();
        assert_eq!(ids, vec!["b2"], "only web hosts lag behind a web rollout");
        switched(&mut fleet, &mut r, "b2");
        assert_eq!(r.tick(&p, &fleet, later, TIMING), vec![Effect::Completed]);
        assert_refused(
            &ask(&mut r, &fleet, "b4", later),
            "for the hosts where role=web",
        );
    }

    /// A heartbeat repeating an agent's last outcome counts as the status it repeats, once:
    /// a lost `rolled_back` still halts the ring, a heartbeat repeated changes nothing, and an
    /// outcome of another version is not this rollout's.
    #[test]
    fn a_heartbeats_outcome_counts_as_its_status_once() {
        let (p, mut fleet, now) = (policy(), fleet(), t0());
        let (mut r, _) = Rollout::start(&AppName::from_static("demo"), v("2.0.0"), &p, now);
        assert!(ask(&mut r, &fleet, "c1", now).granted);
        let outcome = |version: &str, outcome| LastUpdate {
            version: v(version),
            outcome,
            reason: Some("health gate: exited with 3".into()),
            at: now,
            bytes: None,
        };
        use fleetcast_events::v1::UpdateOutcome;
        assert!(!r.record_outcome(
            &AgentId::from_static("c1"),
            &outcome("1.0.0", UpdateOutcome::RolledBack)
        ));
        assert!(r.failures.is_empty());
        assert!(r.record_outcome(
            &AgentId::from_static("c1"),
            &outcome("2.0.0", UpdateOutcome::RolledBack)
        ));
        assert!(!r.slots.contains_key("c1"), "the slot is freed");
        assert!(
            !r.record_outcome(
                &AgentId::from_static("c1"),
                &outcome("2.0.0", UpdateOutcome::RolledBack)
            ),
            "the same outcome again changes nothing"
        );
        // The status, when it was not lost after all, changes nothing either.
        failed(&mut r, "c1", "health gate: exited with 3");
        assert_eq!(r.failures.len(), 1);
        // Two failures in the canary ring (threshold 2): halted.
        fleet.agents.get_mut("b1").expect("b1").ring = RingName::from_static("canary");
        assert!(r.record_outcome(
            &AgentId::from_static("b1"),
            &outcome("2.0.0", UpdateOutcome::Refused)
        ));
        let effects = r.tick(&p, &fleet, now, TIMING);
        assert!(
            matches!(effects.as_slice(), [Effect::Halted { reason }] if reason.contains("c1: health gate")),
            "{effects:?}"
        );
        assert_eq!(r.phase.kind(), tracker::Phase::Halted);
        // A failed download is retried, not a failure of the rollout.
        let (mut r, _) = Rollout::start(&AppName::from_static("demo"), v("2.0.0"), &p, now);
        assert!(!r.record_outcome(
            &AgentId::from_static("c1"),
            &outcome("2.0.0", UpdateOutcome::Failed)
        ));
        assert!(r.failures.is_empty());
    }

    #[test]
    fn rings_go_in_order_with_their_slots_and_soak() {
        let (p, mut fleet, now) = (policy(), fleet(), t0());
        let (mut r, effects) = Rollout::start(&AppName::from_static("demo"), v("2.0.0"), &p, now);
        assert_eq!(
            effects,
            vec![Effect::Desire {
                ring: RingName::from_static("canary")
            }]
        );
        assert_refused(&ask(&mut r, &fleet, "b1", now), "has not started");
        assert!(ask(&mut r, &fleet, "c1", now).granted);
        assert!(
            ask(&mut r, &fleet, "c1", now).granted,
            "asking again keeps the slot"
        );
        assert_eq!(r.tick(&p, &fleet, now, TIMING), vec![]);

        switched(&mut fleet, &mut r, "c1");
        assert_eq!(r.tick(&p, &fleet, now, TIMING), vec![], "canary soaks 30 s");
        let later = now + time::Duration::seconds(31);
        assert_eq!(
            r.tick(&p, &fleet, later, TIMING),
            vec![Effect::Desire {
                ring: RingName::from_static("broad")
            }]
        );
        // 50% of four broad hosts: two at a time.
        assert!(ask(&mut r, &fleet, "b1", later).granted);
        assert!(ask(&mut r, &fleet, "b2", later).granted);
        let full = ask(&mut r, &fleet, "b3", later);
        assert!(!full.granted);
        assert_eq!(
            full.reason.as_deref(),
            Some("ring broad: 2 of 2 slots taken")
        );
        switched(&mut fleet, &mut r, "b1");
        assert!(
            ask(&mut r, &fleet, "b3", later).granted,
            "a finished host frees its slot"
        );
        for agent in ["b2", "b3", "b4"] {
            switched(&mut fleet, &mut r, agent);
        }
        assert_eq!(r.tick(&p, &fleet, later, TIMING), vec![Effect::Completed]);
        assert_eq!(r.phase.kind(), tracker::Phase::Completed);
        let progress = r.progress(&p, &fleet, later, TIMING);
        assert_eq!((progress[1].targets, progress[1].done), (4, 4));
    }

    #[test]
    fn failures_over_the_threshold_halt_before_later_rings_get_the_version() {
        let mut p = policy();
        p.rings[0] = ring("canary", Amount::Count(1), 0);
        let mut fleet = fleet();
        for id in ["c2", "c3"] {
            let mut a = fleet.agents["c1"].clone();
            a.agent_id = AgentId::try_from(id).expect("name");
            fleet.agents.insert(AgentId::try_from(id).expect("name"), a);
        }
        let now = t0();
        let (mut r, _) = Rollout::start(&AppName::from_static("demo"), v("2.0.0"), &p, now);
        assert!(ask(&mut r, &fleet, "c1", now).granted);
        failed(&mut r, "c1", "exited during the health gate (code Some(3))");
        assert_eq!(
            r.tick(&p, &fleet, now, TIMING),
            vec![],
            "one failure is under the threshold of 2"
        );
        assert!(ask(&mut r, &fleet, "c2", now).granted);
        failed(&mut r, "c2", "health probe failed: status 503");
        let effects = r.tick(&p, &fleet, now, TIMING);
        let [Effect::Halted { reason }] = effects.as_slice() else {
            panic!("not halted: {effects:?}");
        };
        assert!(reason.contains("2 of 3 hosts failed"), "{reason}");
        assert!(
            reason.contains("c1: exited") && reason.contains("c2: health probe"),
            "{reason}"
        );
        assert_eq!(r.phase.kind(), tracker::Phase::Halted);
        assert_refused(&ask(&mut r, &fleet, "c3", now), "Halted");
        assert_eq!(
            r.tick(&p, &fleet, now + time::Duration::hours(1), TIMING),
            vec![]
        );
    }

    #[test]
    fn stale_hosts_do_not_hang_a_ring_and_late_hosts_still_converge() {
        let p = AppPolicy::default();
        let mut fleet = fleet();
        for a in fleet.agents.values_mut() {
            a.ring = RingName::from_static("default");
        }
        let now = t0() + time::Duration::minutes(5);
        // b4 went silent five minutes ago; the others just reported.
        for (id, a) in fleet.agents.iter_mut() {
            if id != "b4" {
                a.last_seen = now;
            }
        }
        let (mut r, _) = Rollout::start(&AppName::from_static("demo"), v("2.0.0"), &p, now);
        for agent in ["c1", "b1", "b2", "b3"] {
            switched(&mut fleet, &mut r, agent);
            fleet.agents.get_mut(agent).expect("agent").last_seen = now;
        }
        assert_eq!(r.tick(&p, &fleet, now, TIMING), vec![Effect::Completed]);
        assert_eq!(r.progress(&p, &fleet, now, TIMING)[0].stale, 1);
        // b4 comes back: it still gets its slot.
        let reply = r.request_slot(
            &p,
            &fleet,
            &SlotRequest {
                agent_id: AgentId::from_static("b4"),
                app: AppName::from_static("demo"),
                ring: RingName::from_static("default"),
                version: v("2.0.0"),
            },
            now,
            TIMING,
        );
        assert!(reply.granted);
    }

    #[test]
    fn approval_pause_windows_and_expired_leases() {
        let mut p = policy();
        p.approval = Approval::Manual;
        let fleet = fleet();
        let now = t0();
        let (mut r, effects) = Rollout::start(&AppName::from_static("demo"), v("2.0.0"), &p, now);
        assert_eq!(
            effects.len(),
            1,
            "the first ring may download while awaiting approval"
        );
        assert!(!ask(&mut r, &fleet, "c1", now).granted);
        r.approve(None, None, now).expect("approve");
        r.set_paused(true).expect("pause");
        assert_eq!(
            ask(&mut r, &fleet, "c1", now).reason.as_deref(),
            Some("rollout paused")
        );
        r.set_paused(false).expect("resume");
        assert!(ask(&mut r, &fleet, "c1", now).granted);
        // The canary host dies with its slot; the lease runs out and frees it.
        let mut p2 = p.clone();
        p2.rings[0].windows = vec!["00:00-01:00".into()];
        r.tick(&p, &fleet, now + time::Duration::minutes(11), TIMING);
        assert!(r.slots.is_empty(), "expired lease kept");
        // Outside the ring's window (it is noon): refused until it opens.
        let mut other = fleet.clone();
        other.agents.get_mut("c1").expect("c1").last_seen = now;
        let reply = r.request_slot(
            &p2,
            &other,
            &SlotRequest {
                agent_id: AgentId::from_static("c1"),
                app: AppName::from_static("demo"),
                ring: RingName::from_static("canary"),
                version: v("2.0.0"),
            },
            now,
            TIMING,
        );
        assert_refused(&reply, "maintenance window");
        assert!(reply.retry_after_ms >= 11 * 3600 * 1000);
        r.abort("operator".into());
        assert_eq!(r.phase.kind(), tracker::Phase::Aborted);
        assert!(r.approve(None, None, now).is_err());
    }

    /// A rollout as trackers saved them before the phase carried its data: flat `phase`,
    /// `paused`, `ring_completed` and `reason`.
    const SAVED_RUNNING: &str = r#"{
        "app": "demo",
        "version": "2.0.0",
        "phase": "running",
        "paused": true,
        "ring": 1,
        "ring_started": "2024-10-04T12:00:00Z",
        "ring_completed": "2024-10-04T12:05:00Z",
        "slots": {"b1": {"ring": "broad", "until": "2024-10-04T12:10:00Z"}},
        "failures": {"b2": "health gate: exited with 3"},
        "reason": null,
        "directive": null,
        "only_ring": null,
        "created": "2024-10-04T11:00:00Z",
        "superseded": ["1.5.0"]
    }"#;

    #[test]
    fn rollouts_saved_with_a_flat_phase_still_load_and_save_the_same() {
        let r: Rollout = serde_json::from_str(SAVED_RUNNING).expect("decodes");
        assert_eq!(
            r.phase,
            Phase::Running {
                paused: true,
                ring_completed: Some(t("2024-10-04T12:05:00Z")),
            }
        );
        assert_eq!(r.ring, 1);
        assert_eq!(r.failures.len(), 1);
        // Saved again, it is what it was.
        let saved: serde_json::Value = serde_json::to_value(&r).expect("encodes");
        let before: serde_json::Value = serde_json::from_str(SAVED_RUNNING).expect("json");
        assert_eq!(saved, before);
        let again: Rollout = serde_json::from_value(saved).expect("decodes again");
        assert_eq!(again, r);

        // A halted one keeps its reason; what no longer means anything (a pause, a soak
        // under way when it halted) is dropped.
        let halted = SAVED_RUNNING
            .replace(r#""phase": "running""#, r#""phase": "halted""#)
            .replace(
                r#""reason": null"#,
                r#""reason": "ring broad: 1 of 4 hosts failed""#,
            );
        let r: Rollout = serde_json::from_str(&halted).expect("decodes");
        assert_eq!(
            r.phase,
            Phase::Halted {
                reason: "ring broad: 1 of 4 hosts failed".into()
            }
        );
        let saved = serde_json::to_value(&r).expect("encodes");
        assert_eq!(saved["phase"], "halted");
        assert_eq!(saved["paused"], false);
        assert_eq!(saved["ring_completed"], serde_json::Value::Null);
        assert_eq!(saved["reason"], "ring broad: 1 of 4 hosts failed");
        let summary = r.summary(Vec::new());
        assert_eq!(
            (summary.phase, summary.paused, summary.reason.as_deref()),
            (
                tracker::Phase::Halted,
                false,
                Some("ring broad: 1 of 4 hosts failed")
            )
        );
    }

    fn t(rfc3339: &str) -> OffsetDateTime {
        OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
            .expect("time")
    }

    /// A pause asked for while waiting for approval holds after it; a rollout that ended is
    /// neither approved nor paused, and approving another version is refused, saying which.
    #[test]
    fn steering_follows_the_phase() {
        let mut p = policy();
        p.approval = Approval::Manual;
        let now = t0();
        let (mut r, _) = Rollout::start(&AppName::from_static("demo"), v("2.0.0"), &p, now);
        r.set_paused(true).expect("pause");
        assert_eq!(
            r.approve(Some(&v("3.0.0")), None, now),
            Err(SteerError::OtherVersion {
                app: AppName::from_static("demo"),
                rolling_out: v("2.0.0"),
                asked: v("3.0.0"),
            })
        );
        r.approve(Some(&v("2.0.0")), None, now).expect("approve");
        assert!(r.phase.is_paused() && r.phase.kind() == tracker::Phase::Running);
        r.abort("operator".into());
        assert_eq!(r.phase.reason(), Some("operator"));
        assert!(!r.phase.is_paused(), "an aborted rollout is not paused");
        assert_eq!(
            r.set_paused(false),
            Err(SteerError::Ended(tracker::Phase::Aborted))
        );
        assert_eq!(
            r.approve(None, None, now).expect_err("ended").to_string(),
            "cannot approve a rollout that is Aborted"
        );
    }
}
