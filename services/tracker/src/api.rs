//! What operators exchange with the tracker: commands over NATS (request/reply, JSON: questions
//! on `fleetcast.v1.tracker.query`, steering on `fleetcast.v1.tracker.command`) and the views
//! the HTTP API and CLI show.

use semver::Version;
use serde::{Deserialize, Serialize};

use fleetcast_events::v1::HistoryEntry;

use crate::fleet::AgentView;
pub use crate::history::HistoryQuery;
use crate::rollout::{RingProgress, Rollout};
use crate::timeline::Sample;

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
    /// Roll `app` (or one `ring`) back to `to`, an earlier stored release: the tracker asks
    /// the signer on its own subject (`fleetcast rollback` asks it directly, as its user).
    #[cfg_attr(feature = "cli", command(skip))]
    Rollback {
        app: String,
        to: Version,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ring: Option<String>,
    },
    /// Hosts a rollout has reached that do not run its version, with why: offline, failing,
    /// waiting (approval, a pause, a slot, the update window) or stuck.
    #[cfg_attr(feature = "cli", command(skip))]
    Laggards { app: Option<String> },
    /// What fleetcast did and who asked: releases and their rejections, rollouts and their
    /// outcomes, hosts that rolled back, operators' actions (oldest first).
    History(HistoryQuery),
}

impl Command {
    /// The subject `user` sends it on: questions and steering apart, so NATS permissions can
    /// let a credential ask (CI's `rollout watch`) without letting it steer; steering on the
    /// user's own subject, which says who steered.
    pub fn subject(&self, user: &str) -> String {
        if self.is_query() {
            fleetcast_events::names::TRACKER_QUERY.to_string()
        } else {
            fleetcast_events::names::tracker_command_subject(user)
        }
    }

    /// A question, which changes nothing.
    pub fn is_query(&self) -> bool {
        matches!(
            self,
            Command::Status | Command::Show { .. } | Command::History(_) | Command::Laggards { .. }
        )
    }

    /// Its name, as the history records an action (`approve`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Show { .. } => "show",
            Command::Approve { .. } => "approve",
            Command::Pause { .. } => "pause",
            Command::Resume { .. } => "resume",
            Command::Abort { .. } => "abort",
            Command::Rollback { .. } => "rollback",
            Command::History(_) => "history",
            Command::Laggards { .. } => "laggards",
        }
    }

    /// The app it is about.
    pub fn app(&self) -> Option<&str> {
        match self {
            Command::Status => None,
            Command::History(q) => q.app.as_deref(),
            Command::Laggards { app } => app.as_deref(),
            Command::Show { app }
            | Command::Approve { app, .. }
            | Command::Pause { app }
            | Command::Resume { app }
            | Command::Abort { app }
            | Command::Rollback { app, .. } => Some(app),
        }
    }

    /// The version it names, if any.
    pub fn version(&self) -> Option<&Version> {
        match self {
            Command::Approve { version, .. } => version.as_ref(),
            Command::Rollback { to, .. } => Some(to),
            _ => None,
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
    /// `History` only.
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
    /// `Laggards` only.
    #[serde(default)]
    pub laggards: Vec<crate::laggards::Laggard>,
}

impl Reply {
    pub fn ok(message: String) -> Reply {
        Reply {
            ok: true,
            message,
            rollout: None,
            rollouts: Vec::new(),
            agents: Vec::new(),
            history: Vec::new(),
            laggards: Vec::new(),
        }
    }

    pub fn failed(message: String) -> Reply {
        Reply {
            ok: false,
            ..Reply::ok(message)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutView {
    #[serde(flatten)]
    pub rollout: Rollout,
    pub rings: Vec<RingProgress>,
}

/// A rollout's timeline as the rollout page plots it (`/api/rollouts/{app}/timeline`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineView {
    pub rollout: RolloutView,
    /// Its hosts by state, at each change, oldest first.
    pub samples: Vec<Sample>,
    /// From the history, oldest first: its start and end, each ring's start and end, a halt.
    pub marks: Vec<HistoryEntry>,
    /// Why `marks` is empty though there may be some: the history could not be read (the
    /// tracker is cut off from NATS).
    pub marks_error: Option<String>,
}

/// An agent as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRow {
    #[serde(flatten)]
    pub agent: AgentView,
    pub stale: bool,
}

/// A release as the dashboard lists it (`/api/apps/{app}/releases`): its record without the
/// manifest. Releases carry no notes: this is what there is to say about one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseSummary {
    pub app: String,
    pub version: Version,
    pub state: fleetcast_events::v1::ReleaseState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    /// Why it was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Files, their total size and chunks, once stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<u64>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated: time::OffsetDateTime,
}

impl From<&fleetcast_events::v1::ReleaseRecord> for ReleaseSummary {
    fn from(r: &fleetcast_events::v1::ReleaseRecord) -> Self {
        ReleaseSummary {
            app: r.app.clone(),
            version: r.version.clone(),
            state: r.state,
            blake3: r.blake3.clone(),
            reason: r
                .reason
                .as_ref()
                .map(|why| format!("{}: {}", why.code, why.message)),
            files: r.stored.as_ref().map(|s| s.files),
            total_bytes: r.stored.as_ref().map(|s| s.total_bytes),
            chunks: r.stored.as_ref().map(|s| s.chunks),
            updated: r.updated,
        }
    }
}
