//! Laggards: hosts a rollout has reached (their ring's desired version is its version) that do
//! not run that version, each with the reason as the tracker knows it, so an operator sees at
//! once which hosts hold a rollout back and why. Hosts on their way (downloading, switching,
//! within `stuck_after` of their ring's start) are not laggards; hosts of rings the rollout has
//! not reached are not either (their desired version is still the previous one).
//!
//! For immutable fleets a replacement hook ([`ReplaceSettings`]) is called with the identity of
//! each host offline or stuck for longer than `after` (e.g. to terminate its instance in its
//! auto-scaling group): at most `max_at_once` calls running, never while the host's ring has
//! fewer than `min_healthy` healthy hosts (so a tracker cut off from the fleet, which sees
//! every host offline, replaces nobody), once per host while it lags, each call recorded in the
//! history. `dry_run` (the default) records what would be called and calls nothing.

use fleetcast_events::{AgentId, AppName, RingName};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use semver::Version;

pub use fleetcast_events::tracker::{Lag, Laggard};

use crate::fleet::Fleet;
use crate::policy::AppPolicy;
use crate::rollout::{Phase, Rollout, Timing};

/// The replacement hook (`[laggards.replace]` in the tracker's settings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplaceSettings {
    /// Program and arguments, run with the host's identity in `FLEETCAST_REPLACE_AGENT`,
    /// `_HOST`, `_RING`, `_APP`, `_VERSION` and `_LAG`; exit 0 means done. Empty: no hook.
    pub command: Vec<String>,
    /// How long a host must have been offline (since its last heartbeat) or stuck (since its
    /// ring started) before it is replaced.
    #[serde(with = "humantime_serde")]
    pub after: Duration,
    /// Calls running at once.
    pub max_at_once: usize,
    /// Healthy hosts (live, not failing, not stuck) its ring must have for a host to be
    /// replaced.
    pub min_healthy: usize,
    /// Record what would be called, call nothing.
    pub dry_run: bool,
    /// A call still running after this is killed and counted as failed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ReplaceSettings {
    fn default() -> Self {
        ReplaceSettings {
            command: Vec::new(),
            after: Duration::from_secs(30 * 60),
            max_at_once: 1,
            min_healthy: 1,
            dry_run: true,
            timeout: Duration::from_secs(60),
        }
    }
}

/// The remedies the tracker sends a stuck host's agent (`[remedy]`): it is online and says
/// nothing is wrong, yet it does not run its ring's version. First ask it to read its desired
/// state again and act on it (`retry_after` after its ring started; it may have missed the
/// announcement or be waiting out a retry's backoff), then to restart (`restart_after`: an agent
/// that hangs; the launcher starts it again and it adopts the running apps). Each once per
/// host and version; each recorded in the history (`host.remedied`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemedySettings {
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    #[serde(with = "humantime_serde")]
    pub restart_after: Duration,
}

impl Default for RemedySettings {
    fn default() -> Self {
        RemedySettings {
            enabled: true,
            retry_after: Duration::from_secs(20 * 60),
            restart_after: Duration::from_secs(40 * 60),
        }
    }
}

/// How far the remedies went for one host's lag on one version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Remedied {
    Retry,
    Restart,
}

impl Remedied {
    pub fn said(self) -> &'static str {
        match self {
            Remedied::Retry => "asked to retry now",
            Remedied::Restart => "agent asked to restart",
        }
    }
}

/// The remedies to send now: each stuck laggard whose lag reached the next step that it was
/// not sent yet (`sent`, by agent, app and version).
pub fn to_remedy<'a>(
    laggards: &'a [Laggard],
    now: OffsetDateTime,
    settings: &RemedySettings,
    sent: &BTreeMap<(AgentId, AppName, Version), Remedied>,
) -> Vec<(&'a Laggard, Remedied)> {
    if !settings.enabled {
        return Vec::new();
    }
    laggards
        .iter()
        .filter_map(|l| {
            let Lag::Stuck { since } = l.lag else {
                return None;
            };
            let key = (l.agent_id.clone(), l.app.clone(), l.version.clone());
            let done = sent.get(&key).copied();
            let stuck = now - since;
            if stuck >= settings.restart_after && done < Some(Remedied::Restart) {
                Some((l, Remedied::Restart))
            } else if stuck >= settings.retry_after && done.is_none() {
                Some((l, Remedied::Retry))
            } else {
                None
            }
        })
        .collect()
}

/// The laggards to replace now, of `laggards`: offline or stuck for `after` or longer, not
/// called for already (`called`), in rings with at least `min_healthy` healthy hosts, at most
/// `max_at_once` minus the calls `running`.
pub fn to_replace<'a>(
    laggards: &'a [Laggard],
    fleet: &Fleet,
    now: OffsetDateTime,
    timing: Timing,
    settings: &ReplaceSettings,
    called: &BTreeSet<AgentId>,
    running: usize,
) -> Vec<&'a Laggard> {
    if settings.command.is_empty() {
        return Vec::new();
    }
    // Healthy hosts per (ring, app), counted once: live, and neither failing nor stuck.
    let unhealthy: BTreeSet<(&str, &str)> = laggards
        .iter()
        .filter(|l| matches!(l.lag, Lag::Failing { .. } | Lag::Stuck { .. }))
        .map(|l| (l.agent_id.as_str(), l.app.as_str()))
        .collect();
    let mut healthy: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for agent in fleet
        .agents
        .values()
        .filter(|a| !a.is_stale(now, timing.stale_after))
    {
        for app in agent.apps.keys() {
            if !unhealthy.contains(&(agent.agent_id.as_str(), app.as_str())) {
                *healthy
                    .entry((agent.ring.as_str(), app.as_str()))
                    .or_default() += 1;
            }
        }
    }
    laggards
        .iter()
        .filter(|l| !called.contains(&l.agent_id))
        .filter(|l| match l.lag {
            Lag::Offline { last_seen: since } | Lag::Stuck { since } => {
                now - since >= settings.after
            }
            Lag::Failing { .. } | Lag::Waiting { .. } => false,
        })
        .filter(|l| {
            let ring = (l.ring.as_str(), l.app.as_str());
            healthy.get(&ring).copied().unwrap_or(0) >= settings.min_healthy
        })
        .take(settings.max_at_once.saturating_sub(running))
        .collect()
}

/// The laggards of `rollout`, by ring in policy order, then by agent id. An aborted rollout
/// has none: an operator stopped it, and its hosts keep what they run.
pub fn laggards(
    rollout: &Rollout,
    policy: &AppPolicy,
    fleet: &Fleet,
    now: OffsetDateTime,
    timing: Timing,
    stuck_after: std::time::Duration,
) -> Vec<Laggard> {
    if matches!(rollout.phase, Phase::Aborted { .. }) {
        return Vec::new();
    }
    // The rings whose desired state names this version: the first ones up to the current,
    // or the one ring a ring rollback is for.
    let reached: Vec<&RingName> = match &rollout.only_ring {
        Some(ring) => vec![ring],
        None => policy
            .rings
            .iter()
            .take(rollout.ring.saturating_add(1))
            .map(|r| &r.name)
            .collect(),
    };
    let stuck_at = rollout.ring_started + stuck_after;
    let mut out = Vec::new();
    for ring in reached {
        // Agents are kept by id, so each ring's come out in id order.
        for agent in fleet
            .agents
            .values()
            .filter(|a| a.ring == *ring && rollout.targets(a))
        {
            let Some(app) = agent.apps.get(&rollout.app) else {
                continue;
            };
            if app.running.as_ref() == Some(&rollout.version) {
                continue;
            }
            let lag = if agent.is_stale(now, timing.stale_after) {
                Lag::Offline {
                    last_seen: agent.last_seen,
                }
            } else if let Some(reason) = rollout.failures.get(&agent.agent_id) {
                Lag::Failing {
                    reason: reason.clone(),
                }
            } else if let Some(what) = &app.waiting {
                Lag::Waiting { what: what.clone() }
            } else if now >= stuck_at {
                Lag::Stuck {
                    since: rollout.ring_started,
                }
            } else {
                continue;
            };
            out.push(Laggard {
                app: rollout.app.clone(),
                version: rollout.version.clone(),
                agent_id: agent.agent_id.clone(),
                ring: ring.clone(),
                running: app.running.clone(),
                state: app.state,
                lag,
                remediation: None,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::fleet::tests::heartbeat;
    use fleetcast_events::v1::AppState;

    fn v(s: &str) -> Version {
        Version::parse(s).expect("version")
    }

    const TIMING: Timing = Timing {
        stale_after: Duration::from_secs(45),
        slot_lease: Duration::from_secs(600),
    };
    const STUCK_AFTER: Duration = Duration::from_secs(900);

    /// A fleet of `(agent, ring, running, state)` heard from at `at`.
    fn fleet(agents: &[(&str, &str, &str, AppState)], at: OffsetDateTime) -> Fleet {
        let mut fleet = Fleet::default();
        for (id, ring, running, state) in agents {
            fleet.heartbeat(&heartbeat(id, ring, running, *state, at), at);
        }
        fleet
    }

    #[test]
    fn each_host_behind_a_reached_ring_is_listed_with_its_reason() {
        let t0 = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        let policy: AppPolicy = toml::from_str(
            "[[rings]]\nname = \"canary\"\n[[rings]]\nname = \"broad\"\n[[rings]]\nname = \"rest\"\n",
        )
        .expect("policy");
        let (mut rollout, _) =
            Rollout::start(&AppName::from_static("demo"), v("2.0.0"), &policy, t0);
        rollout.ring = 1;
        rollout.ring_started = t0;
        rollout
            .failures
            .insert(AgentId::from_static("c2"), "health gate: status 503".into());
        let mut fleet = fleet(
            &[
                ("c1", "canary", "2.0.0", AppState::Running),
                ("c2", "canary", "1.0.0", AppState::RolledBack),
                ("b1", "broad", "1.0.0", AppState::Running),
                ("b2", "broad", "1.0.0", AppState::Downloading),
                ("b3", "broad", "1.0.0", AppState::Running),
                ("r1", "rest", "1.0.0", AppState::Running),
            ],
            t0,
        );
        // b3 waits for its update window; b1 went silent.
        if let Some(app) = fleet
            .agents
            .get_mut("b3")
            .and_then(|a| a.apps.get_mut("demo"))
        {
            app.waiting = Some("update window".into());
        }
        let later = t0 + time::Duration::minutes(20);
        for id in ["c1", "c2", "b2", "b3", "r1"] {
            if let Some(agent) = fleet.agents.get_mut(id) {
                agent.last_seen = later;
            }
        }
        let found = laggards(&rollout, &policy, &fleet, later, TIMING, STUCK_AFTER);
        let kinds: Vec<(&str, &str)> = found
            .iter()
            .map(|l| (l.agent_id.as_str(), l.lag.kind()))
            .collect();
        // Done (c1) and not reached (r1) hosts are not laggards; rings in policy order.
        assert_eq!(
            kinds,
            [
                ("c2", "failing"),
                ("b1", "offline"),
                ("b2", "stuck"),
                ("b3", "waiting")
            ]
        );
        assert_eq!(
            found[0].lag,
            Lag::Failing {
                reason: "health gate: status 503".into()
            }
        );
        assert_eq!(found[1].lag, Lag::Offline { last_seen: t0 });

        // Within stuck_after of its ring's start, a downloading host is on its way.
        let soon = t0 + time::Duration::minutes(5);
        let found = laggards(&rollout, &policy, &fleet, soon, TIMING, STUCK_AFTER);
        assert!(found.iter().all(|l| l.agent_id != "b2"), "{found:?}");

        // A ring rollback reaches its one ring only; an aborted rollout has no laggards.
        rollout.only_ring = Some(RingName::from_static("rest"));
        let found = laggards(&rollout, &policy, &fleet, later, TIMING, STUCK_AFTER);
        assert_eq!(
            found
                .iter()
                .map(|l| l.agent_id.as_str())
                .collect::<Vec<_>>(),
            ["r1"]
        );
        rollout.phase = Phase::Aborted {
            reason: "operator".into(),
        };
        assert!(laggards(&rollout, &policy, &fleet, later, TIMING, STUCK_AFTER).is_empty());
    }

    #[test]
    fn replacements_wait_their_time_keep_a_healthy_ring_and_go_a_few_at_a_time() {
        let t0 = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        let policy: AppPolicy = toml::from_str("[[rings]]\nname = \"web\"\n").expect("policy");
        let (mut rollout, _) =
            Rollout::start(&AppName::from_static("demo"), v("2.0.0"), &policy, t0);
        rollout.ring_started = t0;
        let mut fleet = fleet(
            &[
                ("w1", "web", "2.0.0", AppState::Running),
                ("w2", "web", "1.0.0", AppState::Running),
                ("w3", "web", "1.0.0", AppState::Running),
                ("w4", "web", "1.0.0", AppState::Downloading),
            ],
            t0,
        );
        // w2 and w3 go silent at t0; w1 and w4 keep reporting; w4 never gets the version.
        let later = t0 + time::Duration::minutes(40);
        for id in ["w1", "w4"] {
            if let Some(agent) = fleet.agents.get_mut(id) {
                agent.last_seen = later;
            }
        }
        let found = laggards(&rollout, &policy, &fleet, later, TIMING, STUCK_AFTER);
        let settings = ReplaceSettings {
            command: vec!["replace-host".into()],
            after: Duration::from_secs(30 * 60),
            max_at_once: 2,
            min_healthy: 1,
            ..Default::default()
        };
        let ids = |plan: Vec<&Laggard>| plan.iter().map(|l| l.agent_id.clone()).collect::<Vec<_>>();
        let none = BTreeSet::new();
        // Two at once, of the three; one already running leaves room for one.
        assert_eq!(
            ids(to_replace(
                &found, &fleet, later, TIMING, &settings, &none, 0
            )),
            ["w2", "w3"]
        );
        assert_eq!(
            ids(to_replace(
                &found, &fleet, later, TIMING, &settings, &none, 1
            )),
            ["w2"]
        );
        // Once per host.
        let called = BTreeSet::from([AgentId::from_static("w2"), AgentId::from_static("w3")]);
        assert_eq!(
            ids(to_replace(
                &found, &fleet, later, TIMING, &settings, &called, 0
            )),
            ["w4"]
        );
        // Not before `after`.
        let early = t0 + time::Duration::minutes(20);
        let found_early = laggards(&rollout, &policy, &fleet, early, TIMING, STUCK_AFTER);
        assert!(to_replace(&found_early, &fleet, early, TIMING, &settings, &none, 0).is_empty());
        // Never below the ring's healthy minimum (w1 is its one healthy host), and no hook,
        // no call.
        let strict = ReplaceSettings {
            min_healthy: 2,
            ..settings.clone()
        };
        assert!(to_replace(&found, &fleet, later, TIMING, &strict, &none, 0).is_empty());
        let no_hook = ReplaceSettings {
            command: Vec::new(),
            ..settings
        };
        assert!(to_replace(&found, &fleet, later, TIMING, &no_hook, &none, 0).is_empty());
    }

    #[test]
    fn a_stuck_host_is_asked_to_retry_then_to_restart_once_each() {
        let now = OffsetDateTime::now_utc();
        let stuck = |agent: &str, minutes: i64| Laggard {
            app: AppName::from_static("web"),
            version: v("2.0.0"),
            agent_id: AgentId::try_from(agent).expect("agent id"),
            ring: RingName::from_static("default"),
            running: Some(v("1.0.0")),
            state: AppState::Running,
            lag: Lag::Stuck {
                since: now - time::Duration::minutes(minutes),
            },
            remediation: None,
        };
        let mut offline = stuck("h4", 90);
        offline.lag = Lag::Offline {
            last_seen: now - time::Duration::minutes(90),
        };
        let laggards = vec![stuck("h1", 5), stuck("h2", 25), stuck("h3", 45), offline];
        let settings = RemedySettings::default();
        let mut sent = BTreeMap::new();
        let plan: Vec<(&str, Remedied)> = to_remedy(&laggards, now, &settings, &sent)
            .into_iter()
            .map(|(l, r)| (l.agent_id.as_str(), r))
            .collect();
        // Not yet at 5 minutes; a retry at 25; straight to a restart at 45; nothing to an
        // offline host (it hears nothing: the replacement hook is for it).
        assert_eq!(plan, [("h2", Remedied::Retry), ("h3", Remedied::Restart)]);
        for (agent, r) in plan {
            sent.insert(
                (
                    AgentId::try_from(agent).expect("name"),
                    AppName::from_static("web"),
                    v("2.0.0"),
                ),
                r,
            );
        }
        assert!(
            to_remedy(&laggards, now, &settings, &sent).is_empty(),
            "once each"
        );
        // h2 still stuck at 45 minutes: now the restart.
        let later = now + time::Duration::minutes(20);
        let plan: Vec<(&str, Remedied)> = to_remedy(&laggards, later, &settings, &sent)
            .into_iter()
            .map(|(l, r)| (l.agent_id.as_str(), r))
            .collect();
        assert_eq!(plan, [("h1", Remedied::Retry), ("h2", Remedied::Restart)]);
        let off = RemedySettings {
            enabled: false,
            ..settings
        };
        assert!(to_remedy(&laggards, later, &off, &BTreeMap::new()).is_empty());
    }
}
