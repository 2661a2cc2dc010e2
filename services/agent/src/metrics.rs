//! The agent's `/metrics`, served only when `metrics_listen` is set: every host runs an agent,
//! and most fleets watch them through the tracker's `/metrics` instead.
//!
//! Everything comes from the heartbeat values the app loops already hand to the heartbeat loop
//! (state, running version, uptime); updates and rollbacks are counted from the changes between
//! successive values, so the updater needs to know nothing of metrics.

use std::sync::{Arc, Mutex, PoisonError};

use fleetcast_events::v1::{AppHeartbeat, AppState};
use fleetcast_runtime::metrics::{Collect, Exposition, label_value};
use fleetcast_runtime::observe::Identity;
use tokio::sync::watch;
use tokio::time::Instant;

pub(crate) const IDENTITY: Identity = Identity {
    build_info: "fleetcast_agent_build_info",
    nats_connected: "fleetcast_agent_nats_connected",
    version: env!("CARGO_PKG_VERSION"),
};

#[derive(Default)]
pub(crate) struct AgentMetrics {
    apps: Mutex<Vec<AppView>>,
}

/// The last heartbeat value of one app and what the values so far showed.
struct AppView {
    beat: AppHeartbeat,
    /// When `beat` was taken: its uptime is as of then, and a value is taken only when an
    /// update attempt ends (or on a re-check), so the uptime is extrapolated from here.
    seen: Instant,
    updates: u64,
    rollbacks: u64,
}

impl AppView {
    fn new(beat: AppHeartbeat, now: Instant) -> Self {
        AppView {
            beat,
            seen: now,
            updates: 0,
            rollbacks: 0,
        }
    }

    /// A new value: the running version changed (an update, or a rollback an operator
    /// ordered, which moves to an older version), or the agent rolled an update back by itself.
    /// Two failed updates in a row with nothing else between show as one transition into
    /// `rolled_back`, and count once.
    fn observe(&mut self, beat: AppHeartbeat, now: Instant) {
        if beat.running.is_some() && beat.running != self.beat.running {
            self.updates += 1;
        }
        if beat.state == AppState::RolledBack && self.beat.state != AppState::RolledBack {
            self.rollbacks += 1;
        }
        self.beat = beat;
        self.seen = now;
    }

    fn uptime_s(&self, now: Instant) -> f64 {
        let running = self.beat.running.is_some() && self.beat.state != AppState::Stopped;
        if running {
            self.beat.uptime_s as f64 + now.duration_since(self.seen).as_secs_f64().floor()
        } else {
            0.0
        }
    }
}

impl AgentMetrics {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Follows one app's heartbeat values until its loop ends (the sender is dropped).
    pub(crate) fn follow(
        self: &Arc<Self>,
        mut beats: watch::Receiver<AppHeartbeat>,
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
                let beat = beats.borrow_and_update().clone();
                if let Some(view) = me.lock().get_mut(index) {
                    view.observe(beat, Instant::now());
                }
            }
        }
    }

    /// A panic elsewhere while holding the lock leaves the views valid: keep going.
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<AppView>> {
        self.apps.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Collect for AgentMetrics {
    fn collect(&self, out: &mut Exposition) {
        let now = Instant::now();
        let apps = self.lock();
        out.gauge(
            "fleetcast_agent_app_state",
            "1 for each app's state; `version` is the version it runs (`none` before the first install).",
        );
        for view in apps.iter() {
            let version = view
                .beat
                .running
                .as_ref()
                .map_or_else(|| "none".into(), ToString::to_string);
            let state = label_value(&view.beat.state);
            out.sample(
                "fleetcast_agent_app_state",
                &[
                    ("app", &view.beat.app),
                    ("state", &state),
                    ("version", &version),
                ],
                1.0,
            );
        }
        out.gauge(
            "fleetcast_agent_app_uptime_seconds",
            "How long the app's running version has run since the agent started it (0 when none runs).",
        );
        for view in apps.iter() {
            out.sample(
                "fleetcast_agent_app_uptime_seconds",
                &[("app", &view.beat.app)],
                view.uptime_s(now),
            );
        }
        out.counter(
            "fleetcast_agent_updates_total",
            "Times the running version changed since the agent started: updates, and rollbacks an operator ordered.",
        );
        for view in apps.iter() {
            out.sample(
                "fleetcast_agent_updates_total",
                &[("app", &view.beat.app)],
                view.updates as f64,
            );
        }
        out.counter(
            "fleetcast_agent_rollbacks_total",
            "Updates the agent rolled back by itself (health gate failed) since it started.",
        );
        for view in apps.iter() {
            out.sample(
                "fleetcast_agent_rollbacks_total",
                &[("app", &view.beat.app)],
                view.rollbacks as f64,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn beat(state: AppState, running: Option<&str>, uptime_s: u64) -> AppHeartbeat {
        AppHeartbeat {
            app: "web".into(),
            state,
            running: running.map(|v| semver::Version::parse(v).expect("version")),
            staged: None,
            previous: None,
            uptime_s,
        }
    }

    #[test]
    fn updates_and_rollbacks_are_counted_from_heartbeat_changes() {
        let t0 = Instant::now();
        // At start the journal's version, then recovered: neither is an update.
        let mut view = AppView::new(beat(AppState::Stopped, Some("1.0.0"), 0), t0);
        view.observe(beat(AppState::Running, Some("1.0.0"), 0), t0);
        assert_eq!((view.updates, view.rollbacks), (0, 0));
        view.observe(beat(AppState::Running, Some("1.1.0"), 0), t0);
        // Re-checks repeat the same value.
        view.observe(beat(AppState::Running, Some("1.1.0"), 30), t0);
        assert_eq!((view.updates, view.rollbacks), (1, 0));
        view.observe(beat(AppState::RolledBack, Some("1.1.0"), 0), t0);
        view.observe(beat(AppState::RolledBack, Some("1.1.0"), 40), t0);
        assert_eq!((view.updates, view.rollbacks), (1, 1));
        view.observe(beat(AppState::Running, Some("1.3.0"), 0), t0);
        assert_eq!((view.updates, view.rollbacks), (2, 1));
    }

    #[test]
    fn uptime_goes_on_between_heartbeat_values() {
        let t0 = Instant::now();
        let view = AppView::new(beat(AppState::Running, Some("1.0.0"), 10), t0);
        assert_eq!(view.uptime_s(t0 + Duration::from_millis(5_500)), 15.0);
        let none = AppView::new(beat(AppState::Downloading, None, 0), t0);
        assert_eq!(none.uptime_s(t0 + Duration::from_secs(5)), 0.0);
    }

    #[tokio::test]
    async fn exports_each_app_from_its_heartbeat_values() {
        let metrics = AgentMetrics::new();
        let (tx, rx) = watch::channel(beat(AppState::Stopped, None, 0));
        let follow = tokio::spawn(metrics.follow(rx));
        tx.send(beat(AppState::Running, Some("2.0.0"), 0))
            .expect("send");
        drop(tx);
        follow.await.expect("follow ends with its app loop");
        let mut out = Exposition::new();
        metrics.collect(&mut out);
        let text = out.into_string();
        for line in [
            "fleetcast_agent_app_state{app=\"web\",state=\"running\",version=\"2.0.0\"} 1\n",
            "fleetcast_agent_app_uptime_seconds{app=\"web\"} 0\n",
            "fleetcast_agent_updates_total{app=\"web\"} 1\n",
            "fleetcast_agent_rollbacks_total{app=\"web\"} 0\n",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
