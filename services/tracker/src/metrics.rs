//! Prometheus text exposition of the tracker's view: agents per state, per app version and
//! ring, rollout progress and phase, and how far behind the agents' reports it is (all gauges,
//! computed from the tracker's state at every scrape).

use std::collections::BTreeMap;

use fleetcast_runtime::metrics::{Exposition, label_value};
use fleetcast_runtime::observe::Identity;

use fleetcast_events::tracker::{AgentSummary, RolloutSummary};

/// What the tracker reports about itself, as every service does.
pub const IDENTITY: Identity = Identity {
    build_info: "fleetcast_tracker_build_info",
    nats_connected: "fleetcast_tracker_nats_connected",
    version: env!("CARGO_PKG_VERSION"),
};

pub fn render(agents: &[AgentSummary], rollouts: &[RolloutSummary], report_lag_s: f64) -> String {
    let mut out = Exposition::new();
    out.gauge(
        "fleetcast_agents",
        "Agents known to the tracker, live or stale.",
    );
    let stale = agents.iter().filter(|a| a.stale).count();
    out.sample(
        "fleetcast_agents",
        &[("state", "live")],
        (agents.len() - stale) as f64,
    );
    out.sample("fleetcast_agents", &[("state", "stale")], stale as f64);
    out.gauge(
        "fleetcast_agents_stale_metadata",
        "Live agents whose signed metadata is too old or whose root expired (updates may be withheld).",
    );
    let stale_metadata = agents
        .iter()
        .filter(|a| !a.stale && a.metadata.as_ref().is_some_and(|m| m.stale))
        .count();
    out.sample(
        "fleetcast_agents_stale_metadata",
        &[],
        stale_metadata as f64,
    );

    out.gauge(
        "fleetcast_app_agents",
        "Live agents per app, running version, ring and app state.",
    );
    let mut counts: BTreeMap<(String, String, String, String), usize> = BTreeMap::new();
    for row in agents.iter().filter(|a| !a.stale) {
        for (app, view) in &row.apps {
            let version = view
                .running
                .as_ref()
                .map_or_else(|| "none".into(), ToString::to_string);
            let state = label_value(&view.state);
            *counts
                .entry((app.to_string(), version, row.ring.to_string(), state))
                .or_default() += 1;
        }
    }
    for ((app, version, ring, state), n) in &counts {
        out.sample(
            "fleetcast_app_agents",
            &[
                ("app", app),
                ("version", version),
                ("ring", ring),
                ("state", state),
            ],
            *n as f64,
        );
    }

    out.gauge(
        "fleetcast_rollout_hosts",
        "Hosts of each ring of each app's current rollout: targets, done, failed, switching, stale.",
    );
    for view in rollouts {
        let (app, version) = (&view.app, view.version.to_string());
        for ring in &view.rings {
            for (result, n) in [
                ("targets", ring.targets),
                ("done", ring.done),
                ("failed", ring.failed),
                ("switching", ring.switching),
                ("stale", ring.stale),
            ] {
                out.sample(
                    "fleetcast_rollout_hosts",
                    &[
                        ("app", app),
                        ("version", &version),
                        ("ring", &ring.ring),
                        ("result", result),
                    ],
                    n as f64,
                );
            }
        }
    }
    out.gauge(
        "fleetcast_rollout_phase",
        "1 for the phase each app's current rollout is in.",
    );
    for view in rollouts {
        let phase = label_value(&view.phase);
        out.sample(
            "fleetcast_rollout_phase",
            &[
                ("app", &view.app),
                ("version", &view.version.to_string()),
                ("phase", &phase),
            ],
            1.0,
        );
    }
    out.gauge(
        "fleetcast_tracker_report_lag_seconds",
        "How long the last agent report took from the status stream to the tracker.",
    );
    out.sample("fleetcast_tracker_report_lag_seconds", &[], report_lag_s);
    out.into_string()
}
