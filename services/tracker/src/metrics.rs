//! Prometheus text exposition of the tracker's view: agents per state, per app version and
//! ring, rollout progress and phase, and how far behind the agents' reports it is.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::api::{AgentRow, RolloutView};

/// `name{labels} value` lines with their HELP and TYPE (all gauges).
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} gauge");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{}}} {value}", labels.join(","));
        }
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(agents: &[AgentRow], rollouts: &[RolloutView], report_lag_s: f64) -> String {
    let mut out = Exposition(String::new());
    out.family(
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

    out.family(
        "fleetcast_app_agents",
        "Live agents per app, running version, ring and app state.",
    );
    let mut counts: BTreeMap<(String, String, String, String), usize> = BTreeMap::new();
    for row in agents.iter().filter(|a| !a.stale) {
        for (app, view) in &row.agent.apps {
            let version = view
                .running
                .as_ref()
                .map_or_else(|| "none".into(), ToString::to_string);
            let state = serde_json::to_value(view.state)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            *counts
                .entry((app.clone(), version, row.agent.ring.clone(), state))
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

    out.family(
        "fleetcast_rollout_hosts",
        "Hosts of each ring of each app's current rollout: targets, done, failed, switching, stale.",
    );
    for view in rollouts {
        let (app, version) = (&view.rollout.app, view.rollout.version.to_string());
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
    out.family(
        "fleetcast_rollout_phase",
        "1 for the phase each app's current rollout is in.",
    );
    for view in rollouts {
        let phase = serde_json::to_value(view.rollout.phase)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        out.sample(
            "fleetcast_rollout_phase",
            &[
                ("app", &view.rollout.app),
                ("version", &view.rollout.version.to_string()),
                ("phase", &phase),
            ],
            1.0,
        );
    }
    out.family(
        "fleetcast_tracker_report_lag_seconds",
        "How long the last agent report took from the status stream to the tracker.",
    );
    out.sample("fleetcast_tracker_report_lag_seconds", &[], report_lag_s);
    out.0
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_values_are_escaped() {
        assert_eq!(super::escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
