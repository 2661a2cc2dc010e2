//! What operators exchange with the tracker: commands over NATS (request/reply, JSON: questions
//! on `fleetcast.v1.tracker.query`, steering on `fleetcast.v1.tracker.command`) and the views
//! the HTTP API and CLI show.

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::fleet::AgentView;
use crate::rollout::{RingProgress, Rollout};

/// With the `cli` feature, the steering commands are also the `fleetcast` CLI's subcommands of
/// the same names (their doc comments are its help), so they are declared once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Subcommand))]
#[serde(rename_all = "snake_case", tag = "command")]
pub enum Command {
    /// Every agent and every app's rollout.
    #[cfg_attr(feature = "cli", command(skip))]
    Status,
    /// The app's current rollout with its progress per ring.
    #[cfg_attr(feature = "cli", command(skip))]
    Show { app: String },
    /// Let a rollout that waits for approval start switching hosts.
    Approve {
        app: String,
        /// Refuse if the app's rollout is of another version.
        version: Option<Version>,
    },
    /// Stop handing out rollout slots (hosts already switching finish).
    Pause { app: String },
    /// Hand out rollout slots again after a pause.
    Resume { app: String },
    /// Stop a rollout for good (hosts already switched stay switched).
    Abort { app: String },
}

impl Command {
    /// The subject it is sent on: questions and steering apart, so NATS permissions can let a
    /// credential ask (CI's `rollout watch`) without letting it steer.
    pub fn subject(&self) -> &'static str {
        match self {
            Command::Status | Command::Show { .. } => fleetcast_events::names::TRACKER_QUERY,
            Command::Approve { .. }
            | Command::Pause { .. }
            | Command::Resume { .. }
            | Command::Abort { .. } => fleetcast_events::names::TRACKER_COMMAND,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub message: String,
    pub rollout: Option<RolloutView>,
    /// `Status` only.
    #[serde(default)]
    pub rollouts: Vec<RolloutView>,
    #[serde(default)]
    pub agents: Vec<AgentRow>,
}

impl Reply {
    pub fn failed(message: String) -> Reply {
        Reply {
            ok: false,
            message,
            rollout: None,
            rollouts: Vec::new(),
            agents: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutView {
    #[serde(flatten)]
    pub rollout: Rollout,
    pub rings: Vec<RingProgress>,
}

/// An agent as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRow {
    #[serde(flatten)]
    pub agent: AgentView,
    pub stale: bool,
}
