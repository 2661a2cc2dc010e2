//! Laggards: hosts a rollout has reached (their ring's desired version is its version) that do
//! not run that version, each with the reason as the tracker knows it, so an operator sees at
//! once which hosts hold a rollout back and why. Hosts on their way (downloading, switching,
//! within `stuck_after` of their ring's start) are not laggards; hosts of rings the rollout has
//! not reached are not either (their desired version is still the previous one).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use fleetcast_events::v1::AppState;
use semver::Version;

use crate::fleet::Fleet;
use crate::policy::AppPolicy;
use crate::rollout::{Phase, Rollout, Timing};

/// One host behind its ring's desired version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Laggard {
    pub app: String,
    /// The version its ring should run.
    pub version: Version,
    pub agent_id: String,
    pub ring: String,
    pub running: Option<Version>,
    /// The app's state as its agent last said.
    pub state: AppState,
    pub lag: Lag,
}

/// Why a host lags, most telling first: a host that is offline cannot say anything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Lag {
    /// Its heartbeats stopped (stale).
    Offline {
        #[serde(with = "time::serde::rfc3339")]
        last_seen: OffsetDateTime,
    },
    /// It rolled the version back or refused it.
    Failing { reason: String },
    /// It waits to switch: for approval, a pause, a slot or its update window.
    Waiting { what: String },
    /// Online, neither failing nor waiting, and still not on the version `stuck_after` after
    /// its ring started.
    Stuck {
        #[serde(with = "time::serde::rfc3339")]
        since: OffsetDateTime,
    },
}

impl Lag {
    /// Its kind, as the CLI and the dashboard name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Lag::Offline { .. } => "offline",
            Lag::Failing { .. } => "failing",
            Lag::Waiting { .. } => "waiting",
            Lag::Stuck { .. } => "stuck",
        }
    }
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
    if rollout.phase == Phase::Aborted {
        return Vec::new();
    }
    // The rings whose desired state names this version: the first ones up to the current,
    // or the one ring a ring rollback is for.
    let reached: Vec<&str> = match &rollout.only_ring {
        Some(ring) => vec![ring.as_str()],
        None => policy
            .rings
            .iter()
            .take(rollout.ring.saturating_add(1))
            .map(|r| r.name.as_str())
            .collect(),
    };
    let stuck_at = rollout.ring_started + stuck_after;
    let mut out = Vec::new();
    for ring in reached {
        // Agents are kept by id, so each ring's come out in id order.
        for agent in fleet.agents.values().filter(|a| a.ring == ring) {
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
                ring: ring.to_string(),
                running: app.running.clone(),
                state: app.state,
                lag,
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
        let (mut rollout, _) = Rollout::start("demo", v("2.0.0"), &policy, t0);
        rollout.ring = 1;
        rollout.ring_started = t0;
        rollout
            .failures
            .insert("c2".into(), "health gate: status 503".into());
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
        rollout.only_ring = Some("rest".into());
        let found = laggards(&rollout, &policy, &fleet, later, TIMING, STUCK_AFTER);
        assert_eq!(
            found
                .iter()
                .map(|l| l.agent_id.as_str())
                .collect::<Vec<_>>(),
            ["r1"]
        );
        rollout.phase = Phase::Aborted;
        assert!(laggards(&rollout, &policy, &fleet, later, TIMING, STUCK_AFTER).is_empty());
    }
}
