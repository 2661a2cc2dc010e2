//! What operators, CI and dashboards exchange with the tracker: its commands over NATS
//! (request/reply, JSON: questions on `fleetcast.v1.tracker.query`, steering on
//! `fleetcast.v1.tracker.command.<user>`), its replies, and the read models its HTTP API
//! serves (`/api/rollouts`, `/api/agents`, …). These are views made for readers, apart from
//! what the tracker keeps for itself: it may change how it persists a rollout without changing
//! a byte of them. Each has its JSON Schema under `schemas/`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use semver::Version;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub use crate::ident::TokenName;
use crate::ident::{AgentId, AppName, RingName};
use crate::selector::Selector;
use crate::v1::{
    AppState, HistoryEntry, HistoryKind, MetadataStatus, Rejection, ReleaseRecord, ReleaseState,
    ReleaseStored, UpdateBytes,
};

/// A command to the tracker: a question (changes nothing) or a steering action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", tag = "command")]
pub enum Command {
    /// Every agent and every app's rollout.
    Status,
    /// The app's current rollout with its progress per ring.
    Show { app: AppName },
    /// Let a rollout that waits for approval start switching hosts.
    Approve {
        app: AppName,
        /// Refuse if the app's rollout is of another version.
        #[schemars(with = "Option<String>")]
        version: Option<Version>,
        /// Only hosts whose labels match switch (`--where role=web`); the others keep what
        /// they run. Absent: every host of each ring.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<Selector>,
    },
    /// Stop handing out rollout slots (hosts already switching finish).
    Pause { app: AppName },
    /// Hand out rollout slots again after a pause.
    Resume { app: AppName },
    /// Stop a rollout for good (hosts already switched stay switched).
    Abort { app: AppName },
    /// Roll `app` (or one `ring`) back to `to`, an earlier stored release: the tracker asks
    /// the signer on its own subject.
    Rollback {
        app: AppName,
        #[schemars(with = "String")]
        to: Version,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ring: Option<RingName>,
    },
    /// Hosts a rollout has reached that do not run its version, with why: offline, failing,
    /// waiting (approval, a pause, a slot, the update window) or stuck.
    Laggards { app: Option<AppName> },
    /// What fleetcast did and who asked, oldest first.
    History(HistoryQuery),
}

impl Command {
    /// The subject `user` sends it on: questions and steering apart, so NATS permissions can
    /// let a credential ask (CI's `rollout watch`) without letting it steer; steering on the
    /// user's own subject, which says who steered.
    pub fn subject(&self, user: &str) -> String {
        if self.is_query() {
            crate::names::TRACKER_QUERY.to_string()
        } else {
            crate::names::tracker_command_subject(user)
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
    pub fn app(&self) -> Option<&AppName> {
        match self {
            Command::Status => None,
            Command::History(q) => q.app.as_ref(),
            Command::Laggards { app } => app.as_ref(),
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

    /// The hosts it is for, when it picks them by their labels.
    pub fn target(&self) -> Option<&Selector> {
        match self {
            Command::Approve { target, .. } => target.as_ref(),
            _ => None,
        }
    }
}

/// What a history listing asks for (`history` command, `/api/history`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HistoryQuery {
    /// Only this app's entries.
    pub app: Option<AppName>,
    /// Only entries of this kind (e.g. `rollout.halted`, `operator.action`).
    #[serde(default)]
    pub kind: Option<HistoryKind>,
    /// Only entries of this version.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub version: Option<Version>,
    /// Only entries of this actor (a NATS user, `http:<token>`, a service).
    #[serde(default)]
    pub actor: Option<String>,
    /// The newest this many (default 100, at most 10,000).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// The tracker's answer to a [`Command`]; which lists are filled depends on the command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Reply {
    pub ok: bool,
    pub message: String,
    /// `Show` and the steering commands: the rollout after the command.
    pub rollout: Option<RolloutSummary>,
    /// `Status` only.
    #[serde(default)]
    pub rollouts: Vec<RolloutSummary>,
    /// `Status` only.
    #[serde(default)]
    pub agents: Vec<AgentSummary>,
    /// `History` only.
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
    /// `Laggards` only.
    #[serde(default)]
    pub laggards: Vec<Laggard>,
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

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Hosts of the first ring may download; nobody switches before `approve`.
    AwaitingApproval,
    Running,
    /// Stopped by its failure threshold; the reason says which hosts failed and why.
    Halted,
    /// Every ring completed.
    Completed,
    /// Stopped by an operator.
    Aborted,
}

impl Phase {
    /// Still moving: waiting for approval or running (a pause included).
    pub fn is_active(self) -> bool {
        matches!(self, Phase::AwaitingApproval | Phase::Running)
    }
}

/// A host's rollout slot: its ring, and the end of its lease (a host that dies frees it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Lease {
    pub ring: RingName,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub until: OffsetDateTime,
}

/// One ring's hosts for a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RingProgress {
    pub ring: RingName,
    /// Live hosts of the ring that run this app: the denominator.
    pub targets: usize,
    pub done: usize,
    pub failed: usize,
    pub switching: usize,
    /// Hosts of the ring that missed their heartbeats (not counted in `targets`).
    pub stale: usize,
}

impl RingProgress {
    /// `ring` with no host counted yet.
    pub fn new(ring: RingName) -> Self {
        RingProgress {
            ring,
            targets: 0,
            done: 0,
            failed: 0,
            switching: 0,
            stale: 0,
        }
    }
}

/// An app's rollout as the API, the dashboard and `fleetcast rollout watch` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RolloutSummary {
    pub app: AppName,
    #[schemars(with = "String")]
    pub version: Version,
    pub phase: Phase,
    /// No new slots while paused (hosts already switching finish).
    pub paused: bool,
    /// Index in `rings` of the ring being rolled out.
    pub ring: usize,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub ring_started: OffsetDateTime,
    /// When the current ring completed; the next starts after its soak.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schemars(with = "Option<String>")]
    pub ring_completed: Option<OffsetDateTime>,
    /// Hosts holding a slot.
    pub slots: BTreeMap<AgentId, Lease>,
    /// Hosts that rolled this version back or refused it, with the reason.
    pub failures: BTreeMap<AgentId, String>,
    /// Why it halted or was aborted.
    pub reason: Option<String>,
    /// A rollback: its desired states carry the signer's directive (the earlier version's
    /// manifest re-signed) instead of the release's own manifest.
    pub rollback: bool,
    /// A rollback of this ring only.
    #[serde(default)]
    pub only_ring: Option<RingName>,
    /// Only hosts whose labels match are the rollout's (its counts, slots and laggards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Selector>,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub created: OffsetDateTime,
    /// Versions whose rollouts ended without completing because this one (or one it replaced)
    /// took their place (the last 20): `rollout watch --version` of one of them ends.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub superseded: Vec<Version>,
    /// Each ring of the policy, in order.
    pub rings: Vec<RingProgress>,
}

/// A rollout's hosts by state at one moment, summed over its rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Sample {
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub at: OffsetDateTime,
    /// Running the rollout's version.
    pub done: usize,
    /// Holding a rollout slot: switching now.
    pub switching: usize,
    /// Rolled the version back or refused it.
    pub failed: usize,
    /// Live hosts not there yet: their ring has not started, or they wait for a slot, the
    /// approval or their window.
    pub waiting: usize,
}

impl Sample {
    /// The counts of `rings` (a rollout's progress) at `at`.
    pub fn of(rings: &[RingProgress], at: OffsetDateTime) -> Sample {
        let mut s = Sample {
            at,
            done: 0,
            switching: 0,
            failed: 0,
            waiting: 0,
        };
        for r in rings {
            s.done += r.done;
            s.switching += r.switching;
            s.failed += r.failed;
            s.waiting += r.targets.saturating_sub(r.done + r.switching + r.failed);
        }
        s
    }
}

/// A rollout's timeline as the rollout page plots it (`/api/rollouts/{app}/timeline`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TimelineView {
    pub rollout: RolloutSummary,
    /// Its hosts by state, at each change, oldest first.
    pub samples: Vec<Sample>,
    /// From the history, oldest first: its start and end, each ring's start and end, a halt.
    pub marks: Vec<HistoryEntry>,
    /// Why `marks` is empty though there may be some: the history could not be read (the
    /// tracker is cut off from NATS).
    pub marks_error: Option<String>,
}

/// An agent as the API shows it (`/api/agents`, `Status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentSummary {
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
    #[schemars(with = "String")]
    pub last_seen: OffsetDateTime,
    /// Missed its heartbeats: everything above is what it last said.
    pub stale: bool,
}

/// One app of an agent, as its agent last reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AppSummary {
    pub state: AppState,
    #[schemars(with = "Option<String>")]
    pub running: Option<Version>,
    #[schemars(with = "Option<String>")]
    pub staged: Option<Version>,
    #[schemars(with = "Option<String>")]
    pub previous: Option<Version>,
    pub uptime_s: u64,
    /// The last refusal, rollback or failed download, with its reason.
    pub last_error: Option<AppError>,
    /// While the app waits to switch: for what (approval, a pause, a free slot, the update
    /// window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// What the host's last update took from the store (against what its version weighs),
    /// and the version it was for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fetch: Option<LastFetch>,
}

impl AppSummary {
    /// An app first heard of in `state`: nothing else known yet.
    pub fn new(state: AppState) -> AppSummary {
        AppSummary {
            state,
            running: None,
            staged: None,
            previous: None,
            uptime_s: 0,
            last_error: None,
            waiting: None,
            last_fetch: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LastFetch {
    #[schemars(with = "String")]
    pub version: Version,
    #[serde(flatten)]
    pub bytes: UpdateBytes,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AppError {
    #[schemars(with = "Option<String>")]
    pub version: Option<Version>,
    pub state: AppState,
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub at: OffsetDateTime,
}

/// One host behind its ring's desired version (`Laggards`, `/api/laggards`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Laggard {
    pub app: AppName,
    /// The version its ring should run.
    #[schemars(with = "String")]
    pub version: Version,
    pub agent_id: AgentId,
    pub ring: RingName,
    #[schemars(with = "Option<String>")]
    pub running: Option<Version>,
    /// The app's state as its agent last said.
    pub state: AppState,
    pub lag: Lag,
    /// What the tracker did about it (the replacement hook called, or would have been in dry
    /// run); the history has each call and its outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remediation: Option<String>,
}

/// Why a host lags, most telling first: a host that is offline cannot say anything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Lag {
    /// Its heartbeats stopped (stale).
    Offline {
        #[serde(with = "time::serde::rfc3339")]
        #[schemars(with = "String")]
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
        #[schemars(with = "String")]
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

/// A release as `/api/apps/{app}/releases` lists it: its record without the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReleaseSummary {
    pub app: AppName,
    #[schemars(with = "String")]
    pub version: Version,
    pub state: ReleaseState,
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
    #[schemars(with = "String")]
    pub updated: OffsetDateTime,
}

impl From<&ReleaseRecord> for ReleaseSummary {
    fn from(r: &ReleaseRecord) -> Self {
        ReleaseSummary {
            app: r.app.clone(),
            version: r.version.clone(),
            state: r.state,
            blake3: r.blake3.clone(),
            reason: r.reason.as_ref().map(Rejection::to_string),
            files: r.stored.as_ref().map(|s| s.files),
            total_bytes: r.stored.as_ref().map(|s| s.total_bytes),
            chunks: r.stored.as_ref().map(|s| s.chunks),
            updated: r.updated,
        }
    }
}

/// One app's releases (`/api/releases?app=`, the releases page).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AppReleases {
    pub app: AppName,
    /// Newest version first; a version may have several rows (its stored archive, and another
    /// archive refused for reusing it).
    pub releases: Vec<ReleaseRow>,
}

/// A release record as the releases page shows it: without its signed manifest, with its hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReleaseRow {
    #[schemars(with = "String")]
    pub version: Version,
    pub state: ReleaseState,
    /// When the record was last written (signed, stored or rejected).
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub updated: OffsetDateTime,
    /// BLAKE3 of the archive.
    pub blake3: Option<String>,
    /// A rejection's code and message.
    pub reason: Option<Rejection>,
    /// Files, sizes and chunks, once stored.
    pub stored: Option<ReleaseStored>,
    /// Hosts whose agents report running this version (none for a rejected archive).
    pub hosts: Vec<HostRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HostRef {
    pub agent_id: AgentId,
    pub ring: RingName,
    /// Missed its heartbeats: running this version is what it last said.
    pub stale: bool,
}

/// What an HTTP API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TokenRole {
    /// Reads only (when reads need a token); every action refused, and recorded as refused.
    Read,
    /// Reads and actions: approve, pause, resume, abort, rollback.
    Operator,
}

impl TokenRole {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRole::Read => "read",
            TokenRole::Operator => "operator",
        }
    }
}

/// A fresh HTTP API token: 32 random bytes as 64 hex digits.
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What the tracker's settings keep of `token`: its BLAKE3, in hex.
pub fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// The tracker's settings lines (`[[http.tokens]]`) for a token named `name` with `role`.
pub fn settings_entry(name: &TokenName, role: TokenRole, token: &str) -> String {
    format!(
        "[[http.tokens]]\nname = \"{}\"\nrole = \"{}\"\nhash = \"{}\"\n",
        name.as_str(),
        role.as_str(),
        token_hash(token)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_keep_their_json_shape() {
        let approve = Command::Approve {
            app: crate::AppName::from_static("web"),
            version: Some(Version::new(1, 2, 0)),
            target: None,
        };
        let json = serde_json::to_value(&approve).expect("encode");
        assert_eq!(
            json,
            serde_json::json!({"command": "approve", "app": "web", "version": "1.2.0"})
        );
        let targeted: Command = serde_json::from_value(
            serde_json::json!({"command": "approve", "app": "web", "target": "role=web"}),
        )
        .expect("decode");
        assert!(
            matches!(&targeted, Command::Approve { target: Some(t), .. } if t.to_string() == "role=web")
        );
        assert!(!approve.is_query());
        assert_eq!(approve.subject("ci"), "fleetcast.v1.tracker.command.ci");
        let history: Command =
            serde_json::from_str(r#"{"command":"history","app":"web","limit":5}"#).expect("decode");
        assert!(history.is_query());
        assert_eq!(history.app().map(AppName::as_str), Some("web"));
    }

    #[test]
    fn token_names_are_checked_when_read() {
        assert!(serde_json::from_str::<TokenName>(r#""ci.deploy-1""#).is_ok());
        for bad in [r#""""#, r#""has space""#, r#""a/b""#] {
            assert!(serde_json::from_str::<TokenName>(bad).is_err(), "{bad}");
        }
        let long = format!("\"{}\"", "a".repeat(65));
        assert!(serde_json::from_str::<TokenName>(&long).is_err());
    }

    #[test]
    fn a_token_entry_holds_the_hash_not_the_token() {
        let token = new_token().expect("randomness");
        assert_eq!(token.len(), 64);
        let name = TokenName::try_from("ci".to_string()).expect("name");
        let entry = settings_entry(&name, TokenRole::Operator, &token);
        assert!(entry.contains("role = \"operator\""), "{entry}");
        assert!(entry.contains(&token_hash(&token)), "{entry}");
        assert!(!entry.contains(&token), "{entry}");
    }
}
