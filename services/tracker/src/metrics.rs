//! The tracker's `/metrics`: its own registry (its identity and counters), then its view of the
//! fleet at the scrape: agents per state, per app version and ring, rollout progress and phase,
//! and how far behind the agents' reports it is (all gauges, computed by [`FleetView`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use fleetcast_events::tracker::{AgentSummary, RolloutSummary};
use fleetcast_runtime::metrics::{self, NO_LABELS, gauges, label_value};
use fleetcast_runtime::observe::{self, Identity};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;

/// What the tracker reports about itself, as every service does.
pub const IDENTITY: Identity = Identity {
    build_info: "fleetcast_tracker_build_info",
    nats_connected: "fleetcast_tracker_nats_connected",
    version: env!("CARGO_PKG_VERSION"),
};

/// The tracker's registry, holding its identity; `nats` is its connection (made before the
/// tracker, so known from the start).
pub fn registry(nats: &async_nats::Client) -> Registry {
    let mut registry = Registry::default();
    let nats = Arc::new(OnceLock::from(nats.clone()));
    observe::register_identity(&mut registry, IDENTITY, nats);
    registry
}

/// `registry`, then `view`: the view is read from the tracker's state (asynchronously) for each
/// scrape, so it is collected from a registry of its own rather than kept in `registry`.
pub fn render(registry: &Registry, view: FleetView) -> Result<String, fmt::Error> {
    let mut scrape = Registry::default();
    scrape.register_collector(Box::new(view));
    metrics::encode(&[registry, &scrape])
}

/// A sample's labels, names and values.
type Labels<const N: usize> = [(&'static str, String); N];

/// The tracker's state at one scrape.
#[derive(Debug)]
pub struct FleetView {
    pub agents: Vec<AgentSummary>,
    pub rollouts: Vec<RolloutSummary>,
    pub report_lag_s: f64,
}

impl Collector for FleetView {
    fn encode(&self, mut out: DescriptorEncoder) -> fmt::Result {
        let stale = self.agents.iter().filter(|a| a.stale).count();
        gauges(
            &mut out,
            "fleetcast_agents",
            "Agents known to the tracker, live or stale.",
            [
                ([("state", "live")], self.agents.len() - stale),
                ([("state", "stale")], stale),
            ],
        )?;
        let stale_metadata = self
            .live()
            .filter(|a| a.metadata.as_ref().is_some_and(|m| m.stale));
        gauges(
            &mut out,
            "fleetcast_agents_stale_metadata",
            "Live agents whose signed metadata is too old or whose root expired (updates may be withheld).",
            [(NO_LABELS, stale_metadata.count())],
        )?;
        gauges(
            &mut out,
            "fleetcast_app_agents",
            "Live agents per app, running version, ring and app state.",
            self.app_agents(),
        )?;
        gauges(
            &mut out,
            "fleetcast_rollout_hosts",
            "Hosts of each ring of each app's current rollout: targets, done, failed, switching, stale.",
            self.rollout_hosts(),
        )?;
        gauges(
            &mut out,
            "fleetcast_rollout_phase",
            "1 for the phase each app's current rollout is in.",
            self.rollouts.iter().map(|view| {
                let (app, version) = (view.app.to_string(), view.version.to_string());
                let phase = label_value(&view.phase);
                ([("app", app), ("version", version), ("phase", phase)], 1)
            }),
        )?;
        gauges(
            &mut out,
            "fleetcast_tracker_report_lag_seconds",
            "How long the last agent report took from the status stream to the tracker.",
            [(NO_LABELS, self.report_lag_s)],
        )
    }
}

impl FleetView {
    fn live(&self) -> impl Iterator<Item = &AgentSummary> {
        self.agents.iter().filter(|a| !a.stale)
    }

    /// Live agents per app, running version (`none` before the first install), ring and state.
    fn app_agents(&self) -> BTreeMap<Labels<4>, usize> {
        let mut counts = BTreeMap::new();
        for row in self.live() {
            for (app, view) in &row.apps {
                let version = view.running.as_ref();
                let version = version.map_or_else(|| "none".into(), ToString::to_string);
                let labels = [
                    ("app", app.to_string()),
                    ("version", version),
                    ("ring", row.ring.to_string()),
                    ("state", label_value(&view.state)),
                ];
                *counts.entry(labels).or_default() += 1;
            }
        }
        counts
    }

    /// Each rollout's hosts per ring and result.
    fn rollout_hosts(&self) -> Vec<(Labels<4>, usize)> {
        let mut samples = Vec::new();
        for view in &self.rollouts {
            for ring in &view.rings {
                for (result, n) in [
                    ("targets", ring.targets),
                    ("done", ring.done),
                    ("failed", ring.failed),
                    ("switching", ring.switching),
                    ("stale", ring.stale),
                ] {
                    let labels = [
                        ("app", view.app.to_string()),
                        ("version", view.version.to_string()),
                        ("ring", ring.ring.to_string()),
                        ("result", result.to_owned()),
                    ];
                    samples.push((labels, n));
                }
            }
        }
        samples
    }
}
