//! The fleet inventory, folded from agents' heartbeats and status events: per agent its id,
//! host, labels, ring and per app the running, staged and previous version, state and last
//! error. Times are the tracker's own clock when the report arrived (agents' clocks may be
//! off), so staleness is judged on one clock.

use std::collections::BTreeMap;
use std::time::Duration;

// An app's entry is exactly what its agent last reported, which is also how the API shows it.
use fleetcast_events::tracker::{AgentSummary, AppError, AppSummary, LastFetch};
use fleetcast_events::v1::{AgentHeartbeat, AgentStatus, AppState, MetadataStatus};
use fleetcast_events::{AgentId, AppName, RingName};
use semver::Version;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fleet {
    pub agents: BTreeMap<AgentId, AgentView>,
}

/// An agent as the tracker keeps it (saved in its bucket); the API shows it as an
/// [`AgentSummary`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    pub agent_id: AgentId,
    pub host: String,
    pub ring: RingName,
    pub labels: BTreeMap<String, String>,
    pub apps: BTreeMap<AppName, AppSummary>,
    /// The agent's trust metadata as it last reported it (root version, freshness).
    #[serde(default)]
    pub metadata: Option<MetadataStatus>,
    /// The agent's own version as it last reported it (`None`: an agent too old to say).
    #[serde(default)]
    pub agent_version: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
}

impl AgentView {
    /// As the API shows it; `stale`: it missed its heartbeats.
    pub fn summary(&self, stale: bool) -> AgentSummary {
        AgentSummary {
            agent_id: self.agent_id.clone(),
            host: self.host.clone(),
            ring: self.ring.clone(),
            labels: self.labels.clone(),
            apps: self.apps.clone(),
            metadata: self.metadata.clone(),
            agent_version: self.agent_version.clone(),
            last_seen: self.last_seen,
            stale,
        }
    }
}

fn is_waiting(state: AppState) -> bool {
    matches!(state, AppState::WaitingForSlot | AppState::WaitingForWindow)
}

impl Fleet {
    /// The versions of `app` agents run, most run first (then newest), without `except`, at
    /// most `max`: what binary patches for a new release should start from.
    pub fn running_versions(&self, app: &str, except: &Version, max: usize) -> Vec<Version> {
        let mut counts: BTreeMap<&Version, usize> = BTreeMap::new();
        for running in self
            .agents
            .values()
            .filter_map(|a| a.apps.get(app)?.running.as_ref())
            .filter(|v| *v != except)
        {
            *counts.entry(running).or_default() += 1;
        }
        let mut ranked: Vec<(&Version, usize)> = counts.into_iter().collect();
        ranked.sort_by(|(va, a), (vb, b)| b.cmp(a).then(vb.cmp(va)));
        ranked
            .into_iter()
            .take(max)
            .map(|(v, _)| v.clone())
            .collect()
    }

    /// A heartbeat replaces what the agent said about itself (ring, labels, per-app state).
    pub fn heartbeat(&mut self, hb: &AgentHeartbeat, now: OffsetDateTime) {
        let agent = self.agent(&hb.agent_id, now);
        agent.host.clone_from(&hb.host);
        agent.ring.clone_from(&hb.ring);
        agent.labels.clone_from(&hb.labels);
        agent.metadata.clone_from(&hb.metadata);
        agent.agent_version.clone_from(&hb.agent_version);
        agent.last_seen = now;
        for app in &hb.apps {
            let view = agent
                .apps
                .entry(app.app.clone())
                .or_insert_with(|| AppSummary::new(app.state));
            view.state = app.state;
            view.running.clone_from(&app.running);
            view.staged.clone_from(&app.staged);
            view.previous.clone_from(&app.previous);
            view.uptime_s = app.uptime_s;
            if !is_waiting(app.state) {
                view.waiting = None;
            }
            if let Some(update) = &app.last_update
                && let Some(bytes) = update.bytes
            {
                view.last_fetch = Some(LastFetch {
                    version: update.version.clone(),
                    bytes,
                });
            }
            // A failure whose status was lost: the heartbeat's outcome says it, once.
            if let Some(update) = &app.last_update {
                let state = update.outcome.state();
                let known = view.last_error.as_ref().is_some_and(|e| {
                    e.state == state && e.version.as_ref() == Some(&update.version)
                });
                if state != AppState::Running && !known {
                    view.last_error = Some(AppError {
                        version: Some(update.version.clone()),
                        state,
                        reason: update.reason.clone().unwrap_or_default(),
                        at: now,
                    });
                }
            }
        }
    }

    /// A status event updates one app between heartbeats. `ring` is the one its subject
    /// names (which the agent's credential fixes).
    pub fn status(&mut self, st: &AgentStatus, ring: &RingName, now: OffsetDateTime) {
        let agent = self.agent(&st.agent_id, now);
        agent.last_seen = now;
        if agent.ring != *ring {
            agent.ring = ring.clone();
        }
        let view = agent
            .apps
            .entry(st.app.clone())
            .or_insert_with(|| AppSummary::new(st.state));
        // A refusal says nothing about what runs; every other state is the app's own.
        if st.state != AppState::Refused {
            view.state = st.state;
            view.waiting = match st.state {
                AppState::WaitingForSlot => {
                    Some(st.reason.clone().unwrap_or_else(|| "a rollout slot".into()))
                }
                AppState::WaitingForWindow => Some("the host's update window".into()),
                _ => None,
            };
        }
        match st.state {
            AppState::Running => view.running.clone_from(&st.version),
            // A failed download (the store timed out) is retried, not counted against the
            // rollout, but its reason is what an operator needs to see.
            AppState::RolledBack | AppState::Refused | AppState::Failed => {
                view.last_error = Some(AppError {
                    version: st.version.clone(),
                    state: st.state,
                    reason: st.reason.clone().unwrap_or_default(),
                    at: now,
                });
            }
            _ => {}
        }
    }

    fn agent(&mut self, id: &AgentId, now: OffsetDateTime) -> &mut AgentView {
        self.agents.entry(id.clone()).or_insert_with(|| AgentView {
            agent_id: id.clone(),
            host: String::new(),
            ring: RingName::from_static("default"),
            labels: BTreeMap::new(),
            apps: BTreeMap::new(),
            agent_version: None,
            metadata: None,
            last_seen: now,
        })
    }

    /// Removes agents silent for longer than `prune_after`; returns their ids.
    pub fn prune(&mut self, now: OffsetDateTime, prune_after: Duration) -> Vec<AgentId> {
        let gone: Vec<AgentId> = self
            .agents
            .values()
            .filter(|a| silent_for(a, now) > prune_after)
            .map(|a| a.agent_id.clone())
            .collect();
        for id in &gone {
            self.agents.remove(id);
        }
        gone
    }
}

/// How long an agent has been silent.
pub fn silent_for(agent: &AgentView, now: OffsetDateTime) -> Duration {
    Duration::try_from(now - agent.last_seen).unwrap_or_default()
}

impl AgentView {
    /// Missed its heartbeats: shown as stale, left out of rollout denominators.
    pub fn is_stale(&self, now: OffsetDateTime, stale_after: Duration) -> bool {
        silent_for(self, now) > stale_after
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fleetcast_events::v1::{AppHeartbeat, UpdateBytes};

    fn v(s: &str) -> Version {
        Version::parse(s).expect("version")
    }

    /// A heartbeat of agent `id` of `ring` whose app `demo` runs `running` in `state`.
    pub(crate) fn heartbeat(
        id: &str,
        ring: &str,
        running: &str,
        state: AppState,
        at: OffsetDateTime,
    ) -> AgentHeartbeat {
        AgentHeartbeat {
            agent_id: AgentId::try_from(id).expect("agent id"),
            host: id.into(),
            ring: RingName::try_from(ring).expect("ring"),
            labels: BTreeMap::new(),
            apps: vec![AppHeartbeat {
                app: AppName::from_static("demo"),
                state,
                running: Some(v(running)),
                staged: None,
                previous: None,
                uptime_s: 5,
                last_update: None,
            }],
            agent_version: None,
            metadata: None,
            at,
        }
    }

    #[test]
    fn patch_bases_are_the_versions_most_run_without_the_new_one() {
        let t0 = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        let mut fleet = Fleet::default();
        let runs = [
            ("a1", "1.0.0"),
            ("a2", "1.0.0"),
            ("a3", "1.1.0"),
            ("a4", "0.9.0"),
            ("a5", "0.8.0"),
            ("a6", "2.0.0"),
        ];
        for (id, version) in runs {
            fleet.heartbeat(&heartbeat(id, "all", version, AppState::Running, t0), t0);
        }
        // Most run first, then the newest of those run as often; never the new release.
        assert_eq!(
            fleet.running_versions("demo", &v("2.0.0"), 3),
            vec![v("1.0.0"), v("1.1.0"), v("0.9.0")]
        );
        assert!(fleet.running_versions("other", &v("2.0.0"), 3).is_empty());
    }

    #[test]
    fn heartbeats_and_statuses_fold_into_the_inventory() {
        let t0 = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        let mut fleet = Fleet::default();
        fleet.heartbeat(
            &AgentHeartbeat {
                agent_id: AgentId::from_static("a1"),
                host: "host-a1".into(),
                ring: RingName::from_static("canary"),
                labels: BTreeMap::from([("dc".into(), "x".into())]),
                apps: vec![AppHeartbeat {
                    app: AppName::from_static("demo"),
                    state: AppState::Running,
                    running: Some(v("1.0.0")),
                    staged: None,
                    previous: None,
                    uptime_s: 5,
                    last_update: Some(fleetcast_events::v1::LastUpdate {
                        version: v("1.0.0"),
                        outcome: fleetcast_events::v1::UpdateOutcome::Committed,
                        reason: None,
                        at: t0,
                        bytes: Some(UpdateBytes {
                            fetched: 47_000,
                            metadata: 15_000,
                            chunks: 32_000,
                            release: 30 << 20,
                            patches: 0,
                        }),
                    }),
                }],
                agent_version: Some("0.1.0".into()),
                metadata: Some(MetadataStatus {
                    root_version: 2,
                    timestamp: None,
                    stale: true,
                    reason: Some("no timestamp".into()),
                    notes: Vec::new(),
                }),
                at: t0,
            },
            t0,
        );
        let status = |state, version: &str, reason: Option<&str>| AgentStatus {
            agent_id: AgentId::from_static("a1"),
            app: AppName::from_static("demo"),
            state,
            version: Some(v(version)),
            progress_bytes: None,
            reason: reason.map(String::from),
            at: t0,
        };
        fleet.status(
            &status(AppState::Running, "2.0.0", None),
            &RingName::from_static("canary"),
            t0,
        );
        fleet.status(
            &status(AppState::Refused, "0.9.0", Some("older than 2.0.0")),
            &RingName::from_static("canary"),
            t0,
        );
        let a = &fleet.agents["a1"];
        assert_eq!(a.ring, "canary");
        assert_eq!(a.agent_version.as_deref(), Some("0.1.0"));
        assert!(
            a.metadata
                .as_ref()
                .is_some_and(|m| m.stale && m.root_version == 2)
        );
        let app = &a.apps["demo"];
        // What the last update cost, as its heartbeat said.
        assert_eq!(
            app.last_fetch
                .as_ref()
                .map(|f| (f.version.clone(), f.bytes.fetched)),
            Some((v("1.0.0"), 47_000))
        );
        assert_eq!(app.running, Some(v("2.0.0")));
        assert_eq!(
            app.state,
            AppState::Running,
            "a refusal does not change what runs"
        );
        assert_eq!(
            app.last_error.as_ref().map(|e| e.reason.as_str()),
            Some("older than 2.0.0")
        );

        // What a waiting host waits for, until it moves on: (state reported, its reason,
        // what the fleet then says it waits for).
        for (state, reason, waiting) in [
            (
                AppState::WaitingForSlot,
                Some("awaiting approval"),
                Some("awaiting approval"),
            ),
            (
                AppState::WaitingForWindow,
                None,
                Some("the host's update window"),
            ),
            (AppState::Switching, None, None),
        ] {
            fleet.status(
                &status(state, "3.0.0", reason),
                &RingName::from_static("canary"),
                t0,
            );
            assert_eq!(
                fleet.agents["a1"].apps["demo"].waiting.as_deref(),
                waiting,
                "{state:?}"
            );
        }
        let a = &fleet.agents["a1"];

        let later = t0 + time::Duration::minutes(2);
        assert!(a.is_stale(later, Duration::from_secs(60)));
        assert!(!a.is_stale(t0, Duration::from_secs(60)));
        assert!(fleet.prune(later, Duration::from_secs(600)).is_empty());
        assert_eq!(
            fleet.prune(later + time::Duration::hours(1), Duration::from_secs(600)),
            vec!["a1".to_string()]
        );
    }
}
