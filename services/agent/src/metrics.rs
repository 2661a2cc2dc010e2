//! The agent's `/metrics`, served only when `metrics_listen` is set: every host runs an agent,
//! and most fleets watch them through the tracker's `/metrics` instead.
//!
//! Everything comes from the values the app loops already hand to the heartbeat loop: the
//! heartbeat (state, running version, uptime) and the runner's counts of updates and rollbacks.
//! The counts are kept by the runner itself, not read from changes between values: two failed
//! updates in a row look the same as one, and a watch channel keeps only the latest value.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use fleetcast_events::v1::AppState;
use fleetcast_runtime::metrics::{counters, gauges, label_value};
use fleetcast_runtime::observe::Identity;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::updater::Snapshot;

pub(crate) const IDENTITY: Identity = Identity {
    build_info: "fleetcast_agent_build_info",
    nats_connected: "fleetcast_agent_nats_connected",
    version: env!("CARGO_PKG_VERSION"),
};

/// The apps' latest values, turned into samples at each scrape (a collector: nothing is counted
/// here, the runners keep the counts).
#[derive(Debug, Default)]
pub(crate) struct AgentMetrics {
    apps: Mutex<Vec<AppView>>,
}

/// The last value of one app.
#[derive(Debug)]
struct AppView {
    last: Snapshot,
    /// When `last` was taken: its uptime is as of then, and a value is taken only when an
    /// update attempt ends (or on a re-check), so the uptime is extrapolated from here.
    seen: Instant,
}

impl AppView {
    fn new(last: Snapshot, now: Instant) -> Self {
        AppView { last, seen: now }
    }

    /// Whole seconds, as the heartbeat reports them.
    fn uptime_s(&self, now: Instant) -> u64 {
        let beat = &self.last.beat;
        let running = beat.running.is_some() && beat.state != AppState::Stopped;
        if running {
            beat.uptime_s + now.duration_since(self.seen).as_secs()
        } else {
            0
        }
    }

    /// Its last update's bytes by kind (none before the first update that fetched anything).
    fn last_update_bytes(&self) -> Vec<([(&'static str, String); 3], u64)> {
        let Some(update) = &self.last.beat.last_update else {
            return Vec::new();
        };
        let Some(b) = update.bytes else {
            return Vec::new();
        };
        [
            ("fetched", b.fetched),
            ("metadata", b.metadata),
            ("chunks", b.chunks),
            ("patches", b.patches),
            ("release", b.release),
        ]
        .into_iter()
        .map(|(kind, n)| {
            let labels = [
                ("app", self.app()),
                ("version", update.version.to_string()),
                ("kind", kind.to_owned()),
            ];
            (labels, n)
        })
        .collect()
    }

    fn app(&self) -> String {
        self.last.beat.app.as_str().to_owned()
    }

    /// The `version` label: what the app runs, `none` before its first install.
    fn running(&self) -> String {
        let running = self.last.beat.running.as_ref();
        running.map_or_else(|| "none".into(), ToString::to_string)
    }
}

impl AgentMetrics {
    /// The agent's metrics, and the registry they are collected in (its endpoint's).
    pub(crate) fn registered() -> (Arc<Self>, Registry) {
        let metrics = Arc::new(Self::default());
        let mut registry = Registry::default();
        registry.register_collector(Box::new(metrics.clone()));
        (metrics, registry)
    }

    /// Follows one app's heartbeat values until its loop ends (the sender is dropped).
    pub(crate) fn follow(
        self: &Arc<Self>,
        mut beats: watch::Receiver<Snapshot>,
    ) -> impl Future<Output = ()> + use<> {
        let index = {
            let mut apps = self.lock();
            apps.push(AppView::new(
                beats.borrow_and_update().clone(),
                Instant::now(),
            ));
            apps.len() - 1
        };
        let me = self.clone();
        async move {
            while beats.changed().await.is_ok() {
                let last = beats.borrow_and_update().clone();
                if let Some(view) = me.lock().get_mut(index) {
                    *view = AppView::new(last, Instant::now());
                }
            }
        }
    }

    /// A panic elsewhere while holding the lock leaves the views valid: keep going.
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<AppView>> {
        self.apps.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Collector for AgentMetrics {
    fn encode(&self, mut out: DescriptorEncoder) -> fmt::Result {
        let now = Instant::now();
        let apps = self.lock();
        gauges(
            &mut out,
            "fleetcast_agent_app_state",
            "1 for each app's state; `version` is the version it runs (`none` before the first install).",
            apps.iter().map(|view| {
                let state = label_value(&view.last.beat.state);
                let labels = [
                    ("app", view.app()),
                    ("state", state),
                    ("version", view.running()),
                ];
                (labels, 1)
            }),
        )?;
        gauges(
            &mut out,
            "fleetcast_agent_app_uptime_seconds",
            "How long the app's running version has run since the agent started it (0 when none runs).",
            apps.iter()
                .map(|view| ([("app", view.app())], view.uptime_s(now))),
        )?;
        gauges(
            &mut out,
            "fleetcast_agent_last_update_bytes",
            "What the app's last update took from the store: `fetched` in all, of which `metadata` (announcement, tree nodes, patch list), `chunks` and `patches` (binary patches of rebuilt files); `release` is what the version's files weigh.",
            apps.iter().flat_map(AppView::last_update_bytes),
        )?;
        counters(
            &mut out,
            "fleetcast_agent_updates_total",
            "Times the running version changed since the agent started: updates, and rollbacks an operator ordered.",
            apps.iter()
                .map(|view| ([("app", view.app())], view.last.counts.updates)),
        )?;
        counters(
            &mut out,
            "fleetcast_agent_rollbacks_total",
            "Updates the agent rolled back by itself (health gate or post-switch hook failed) since it started.",
            apps.iter()
                .map(|view| ([("app", view.app())], view.last.counts.rollbacks)),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fleetcast_events::v1::AppHeartbeat;

    use super::*;
    use crate::updater::Counts;
    use fleetcast_events::AppName;

    fn snap(state: AppState, running: Option<&str>, uptime_s: u64, counts: Counts) -> Snapshot {
        Snapshot {
            beat: AppHeartbeat {
                app: AppName::from_static("web"),
                state,
                running: running.map(|v| semver::Version::parse(v).expect("version")),
                staged: None,
                previous: None,
                uptime_s,
                last_update: None,
            },
            counts,
            accepted: None,
            running_since: None,
        }
    }

    #[test]
    fn uptime_goes_on_between_heartbeat_values() {
        let t0 = Instant::now();
        let none = Counts::default();
        let view = AppView::new(snap(AppState::Running, Some("1.0.0"), 10, none), t0);
        assert_eq!(view.uptime_s(t0 + Duration::from_millis(5_500)), 15);
        let idle = AppView::new(snap(AppState::Downloading, None, 0, none), t0);
        assert_eq!(idle.uptime_s(t0 + Duration::from_secs(5)), 0);
    }

    #[tokio::test]
    async fn exports_each_app_from_its_latest_value() {
        let (metrics, registry) = AgentMetrics::registered();
        let (tx, rx) = watch::channel(snap(AppState::Stopped, None, 0, Counts::default()));
        let follow = tokio::spawn(metrics.follow(rx));
        let counts = Counts {
            updates: 1,
            rollbacks: 2,
        };
        let mut last = snap(AppState::RolledBack, Some("2.0.0"), 0, counts);
        last.beat.last_update = Some(fleetcast_events::v1::LastUpdate {
            version: semver::Version::new(3, 0, 0),
            outcome: fleetcast_events::v1::UpdateOutcome::RolledBack,
            reason: None,
            at: time::OffsetDateTime::UNIX_EPOCH,
            bytes: Some(fleetcast_events::v1::UpdateBytes {
                fetched: 300,
                metadata: 100,
                chunks: 200,
                release: 5000,
                patches: 0,
            }),
        });
        tx.send(last).expect("send");
        drop(tx);
        follow.await.expect("follow ends with its app loop");
        let text = fleetcast_runtime::metrics::encode(&[&registry]).expect("encode");
        for line in [
            "fleetcast_agent_app_state{app=\"web\",state=\"rolled_back\",version=\"2.0.0\"} 1\n",
            "fleetcast_agent_app_uptime_seconds{app=\"web\"} 0\n",
            "fleetcast_agent_updates_total{app=\"web\"} 1\n",
            "fleetcast_agent_rollbacks_total{app=\"web\"} 2\n",
            "fleetcast_agent_last_update_bytes{app=\"web\",version=\"3.0.0\",kind=\"fetched\"} 300\n",
            "fleetcast_agent_last_update_bytes{app=\"web\",version=\"3.0.0\",kind=\"metadata\"} 100\n",
            "fleetcast_agent_last_update_bytes{app=\"web\",version=\"3.0.0\",kind=\"release\"} 5000\n",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
