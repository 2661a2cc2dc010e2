//! Version 1 of every event and stored record. Field names are the contract: add optional fields,
//! never rename; a breaking change is a `v2` module with its own subjects.

use schemars::JsonSchema;
use semver::Version;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ident::{AgentId, AppName, RingName};
use crate::manifest::SignedManifest;

/// Published by CI (`fleetcast publish`) after uploading the archive to the incoming store. JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleasePublished {
    /// Checked by the watcher, not as the event is read: a CI job that names a bad app gets a
    /// `package.rejected` (`invalid_name`) about its own publish, as for its other mistakes,
    /// rather than an undecodable event.
    pub app: String,
    #[schemars(with = "String")]
    pub version: Version,
    /// Name of the archive in the incoming object store.
    pub object: String,
    pub size: u64,
    /// BLAKE3 of the whole archive, hex: the watcher refuses an object that does not match.
    pub blake3: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_by: Option<String>,
}

/// Where a package came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PackageSource {
    /// Dropped into the watched folder as `file`.
    DropFolder { file: String },
    /// Published by CI as a `release.published` event.
    Ci {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        published_by: Option<String>,
    },
}

/// The watcher validated an archive and stored it as `object` in the incoming store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PackageDetected {
    pub app: AppName,
    #[schemars(with = "String")]
    pub version: Version,
    pub object: String,
    pub size: u64,
    pub blake3: String,
    pub source: PackageSource,
}

/// Why something was refused: a stable code for machines, a precise message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rejection {
    pub code: RejectCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// File name is not `NAME-VERSION.zip` with a semver version, or the app name is unsafe.
    InvalidName,
    /// Not a readable zip: corrupt, truncated, or an entry whose data does not match its header.
    CorruptArchive,
    /// An entry path with `..` components.
    PathTraversal,
    /// An entry path that is absolute.
    AbsolutePath,
    /// A symbolic link whose target leaves the package.
    LinkOutsidePackage,
    /// Two entries with the same path.
    DuplicateEntry,
    TooManyEntries,
    /// Total or single-entry uncompressed size over the limit.
    TooLarge,
    /// Compression ratio over the limit (zip bomb).
    CompressionRatio,
    /// The package's own `fleetcast.toml` does not parse or is not valid.
    InvalidPackageConfig,
    /// An event that does not decode or is not valid.
    InvalidEvent,
    /// The archive named by an event is missing or differs from what the event says.
    ArchiveMismatch,
    /// The version is not strictly newer than the last one signed for the app.
    VersionNotNewer,
    /// The app is not in the signer's list of known apps.
    UnknownApp,
    /// The signed manifest does not verify or does not match the archive.
    ManifestMismatch,
    /// A rollback request whose `from` is not the app's latest signed version (the signer's
    /// own record): a directive replacing versions never signed would raise every agent's
    /// highest accepted version and block the releases below it.
    RollbackFromNotLatest,
    /// The service had no room on its disk for the archive: refused rather than retried
    /// forever; publish it again once there is room.
    DiskFull,
    /// A file or folder name over 255 bytes, or a path over 4,096: no filesystem takes it.
    NameTooLong,
    /// A name that is both a file (or link) and a folder; or, when refused by the limits,
    /// names that differ only in case.
    PathConflict,
    /// No file at all.
    EmptyPackage,
}

impl std::fmt::Display for RejectCode {
    /// The code as serde names it (`path_traversal`): the schemas, metrics, logs,
    /// `.reason.txt` notes and the CLI all spell it this one way.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::wire_name(self))
    }
}

impl std::fmt::Display for Rejection {
    /// `code: message`, the form of `.reason.txt`, `releases` and the CLI's errors.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// The watcher refused a package. Nothing was stored for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PackageRejected {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<AppName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub version: Option<Version>,
    pub source: PackageSource,
    pub reason: Rejection,
    /// BLAKE3 of the refused archive, when known (always for a CI upload: the event names
    /// it), so whoever published it finds *its* archive's outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
}

/// A service refused an event it could not decode or that broke the contract. Nothing was done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventRejected {
    /// The service that refused it: `watcher`, `signer` or `distributor`.
    pub stage: String,
    pub subject: String,
    pub reason: Rejection,
}

/// The signer hashed every file and signed the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseSigned {
    pub app: AppName,
    #[schemars(with = "String")]
    pub version: Version,
    pub object: String,
    /// BLAKE3 of the archive the signer read.
    pub blake3: String,
    pub manifest: SignedManifest,
}

/// An operator asks to move `app` back to `to`, an earlier stored release, replacing every
/// version up to `from` (`fleetcast rollback`); only in `ring` when given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequested {
    pub app: AppName,
    #[schemars(with = "String")]
    pub to: Version,
    #[schemars(with = "String")]
    pub from: Version,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring: Option<RingName>,
    pub requested_by: String,
}

/// The signer's rollback directive: `to`'s manifest re-signed with `rollback_from = from`, which
/// agents accept once although it is older than what they run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackSigned {
    pub app: AppName,
    #[schemars(with = "String")]
    pub to: Version,
    #[schemars(with = "String")]
    pub from: Version,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring: Option<RingName>,
    pub manifest: SignedManifest,
}

/// A pipeline stage refused a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRejected {
    pub app: AppName,
    #[schemars(with = "String")]
    pub version: Version,
    /// `signer` or `distributor`.
    pub stage: String,
    pub reason: Rejection,
    /// BLAKE3 of the refused archive, so whoever published it finds *its* archive's outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
}

/// Every chunk and every node of the release's tree are stored: agents can fetch the release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseStored {
    pub app: AppName,
    #[schemars(with = "String")]
    pub version: Version,
    pub files: u64,
    /// Sum of the files' uncompressed sizes.
    pub total_bytes: u64,
    /// Chunks cut from the archive: 0 when the release's tree was stored already (the same
    /// files published before), as the archive was then not read.
    pub chunks: u64,
    /// Chunks this release added to the store (the others were already there).
    pub new_chunks: u64,
    /// Compressed bytes this release added to the store.
    pub new_stored_bytes: u64,
    /// Nodes of the release's file tree, and how many of them were new to the store.
    pub tree_nodes: u64,
    pub new_tree_nodes: u64,
}

/// The tracker asks the distributor for binary patches of `version`'s files from the same
/// paths in `bases`: the versions of the app its agents run now (most run first, at most a
/// few). Patches are an optimisation: a release rolls out without them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchesWanted {
    pub app: AppName,
    #[schemars(with = "String")]
    pub version: Version,
    #[schemars(with = "Vec<String>")]
    pub bases: Vec<Version>,
}

/// A release's progress through the pipeline, as kept in the releases bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseState {
    Signed,
    Stored,
    Rejected,
}

/// Record of one app+version in the releases bucket (JSON, read by the CLI and the tracker).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRecord {
    pub app: AppName,
    #[schemars(with = "String")]
    pub version: Version,
    pub state: ReleaseState,
    /// BLAKE3 of the archive this record is about: the same version published again with
    /// other content is another archive, with its own outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Rejection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<SignedManifest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<ReleaseStored>,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub updated: OffsetDateTime,
}

/// One chunk of a file, as a release's tree lists it (`tree.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    /// BLAKE3 of the chunk's uncompressed content, hex; also its subject's last token.
    pub id: String,
    /// Uncompressed length.
    pub len: u32,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What one update cost a host, against what its version weighs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateBytes {
    /// Everything taken from the store: `metadata` + `chunks` + `patches`.
    pub fetched: u64,
    /// The desired state with its signed manifest (as JSON), the release tree's nodes the
    /// host did not hold, and the release's patch list if it read one.
    pub metadata: u64,
    /// Chunks, as stored (compressed where that paid).
    pub chunks: u64,
    /// Binary patches of rebuilt files (those refused included). Absent when none was used, as
    /// agents before patches send it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub patches: u64,
    /// The version's files, uncompressed: what a full copy weighs.
    pub release: u64,
}

/// Desired version of an app for one ring, written by the tracker and watched by agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    pub app: AppName,
    pub ring: RingName,
    #[schemars(with = "String")]
    pub version: Version,
    pub manifest: SignedManifest,
    /// The rollout limits how many hosts switch at once: before its disruptive step an agent
    /// asks the slot service ([`SlotRequest`] on `fleetcast.v1.slot.<app>.<agent id>`) and
    /// waits for a grant. Downloading never waits for a slot.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub slot: bool,
}

/// An agent asking for a rollout slot before it stops its app to switch (request/reply, on
/// `fleetcast.v1.slot.<app>.<agent id>`). The tracker takes the agent and the app from the
/// subject, which the agent's credential fixes, and the ring from the agent's reports; a body
/// that disagrees is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlotRequest {
    pub agent_id: AgentId,
    pub app: AppName,
    pub ring: RingName,
    #[schemars(with = "String")]
    pub version: Version,
}

/// The slot service's answer. A grant holds until the agent reports the outcome (`running` or
/// `rolled_back`) or the service's lease runs out; a refusal says when to ask again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlotReply {
    pub granted: bool,
    /// Ask again after this long (ignored when granted); the agent bounds it.
    #[serde(default)]
    pub retry_after_ms: u64,
    /// Why not (all slots taken, rollout paused, …), shown in the agent's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An agent's state for one app (a first cut; the agent issue extends it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AppState {
    Running,
    Downloading,
    Verifying,
    Switching,
    HealthChecking,
    RolledBack,
    /// Downloaded and verified; waiting for the local update window to switch.
    WaitingForWindow,
    /// Downloaded and verified; waiting for a rollout slot (the reason says why).
    WaitingForSlot,
    /// An announcement was refused (bad signature, expired, older than accepted, …); the app
    /// keeps running the version it ran.
    Refused,
    Failed,
    Stopped,
}

impl AppState {
    /// An update that did not take: rolled back by the agent, or refused.
    pub fn is_failure(self) -> bool {
        matches!(self, AppState::RolledBack | AppState::Refused)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentStatus {
    pub agent_id: AgentId,
    pub app: AppName,
    pub state: AppState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub version: Option<Version>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub at: OffsetDateTime,
}

/// The tracker asks one agent to act on a lag it does not get out of alone (the tracker's
/// laggard remedies): published on `fleetcast.v1.remedy.<agent id>`, which only the tracker
/// may publish on and only that agent read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentRemedy {
    pub agent_id: AgentId,
    pub action: RemedyAction,
    /// Why, as the tracker's laggards say it.
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub at: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum RemedyAction {
    /// Read the app's desired state again and act on it now (a missed announcement, a wait
    /// in a retry's backoff).
    Retry { app: AppName },
    /// Exit and be started again by the launcher, which keeps the apps running (an agent
    /// that hangs). An agent not under the launcher ignores it: it would restart its apps.
    Restart,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentHeartbeat {
    pub agent_id: AgentId,
    pub host: String,
    pub ring: RingName,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    pub apps: Vec<AppHeartbeat>,
    /// The agent's own version (fleetcast's), so agent upgrades can be followed like any app's
    /// (absent from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// How current the agent's signed metadata is (absent from agents before fleetcast 0.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<MetadataStatus>,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub at: OffsetDateTime,
}

/// A verifier's view of its trust metadata: which root it trusts, the freshest timestamp it
/// holds, and whether that view is too old (a broker withholding updates) or its root expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetadataStatus {
    /// 0 when the agent pins its keys instead of following a root.
    pub root_version: u64,
    /// When the freshest signer timestamp it holds was issued.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schemars(with = "Option<String>")]
    pub timestamp: Option<OffsetDateTime>,
    pub stale: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the verifier refused or noticed about its trust state besides staleness: a saved
    /// root or timestamp that did not verify, a signed timestamp from beyond its clock's
    /// tolerance, a newer root announced than it holds, an app behind the newest version
    /// signed for it for longer than its `max_metadata_age` (which a rollout's rings can
    /// explain). Empty from agents before fleetcast 0.3.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AppHeartbeat {
    pub app: AppName,
    pub state: AppState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub running: Option<Version>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub staged: Option<Version>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub previous: Option<Version>,
    pub uptime_s: u64,
    /// How this agent's last update of the app ended, repeated in every heartbeat: a status
    /// report that was lost (the agent's connection dropped as it published) still reaches the
    /// rollout, which folds it as it would the status (absent from agents before fleetcast
    /// 0.3, and until the agent's first outcome since it started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update: Option<LastUpdate>,
}

/// The end of one update of an app on one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LastUpdate {
    #[schemars(with = "String")]
    pub version: Version,
    pub outcome: UpdateOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the update took from the store, when it took something to stage the version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<UpdateBytes>,
    /// When it ended, on the agent's clock.
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub at: OffsetDateTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpdateOutcome {
    /// The version passed its health gate and runs (the status `running`).
    Committed,
    /// It failed its health gate or a hook; the previous version runs again (`rolled_back`).
    RolledBack,
    /// Fetching or installing it failed for a reason that may pass; retried (`failed`).
    Failed,
    /// Its announcement was refused; nothing changed (`refused`).
    Refused,
}

impl UpdateOutcome {
    /// The status report this outcome repeats.
    pub fn state(self) -> AppState {
        match self {
            UpdateOutcome::Committed => AppState::Running,
            UpdateOutcome::RolledBack => AppState::RolledBack,
            UpdateOutcome::Failed => AppState::Failed,
            UpdateOutcome::Refused => AppState::Refused,
        }
    }
}

/// One thing fleetcast did, or an operator asked, as the history stream keeps it and as
/// notifications carry it (`names::history_subject`). The tracker writes every entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HistoryEntry {
    /// When it happened: for a pipeline event, when the stream received it.
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub at: OffsetDateTime,
    pub kind: HistoryKind,
    /// Absent for a package whose name did not parse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<AppName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub version: Option<Version>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring: Option<RingName>,
    /// The host, for `host.rolled_back`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentId>,
    /// Who did it, as authenticated: the NATS user of the request (its subject, which only
    /// that user may publish on), `http:<token name>` for a dashboard or API action,
    /// `drop-folder` for a package dropped on the watcher's disk, or the service that acted
    /// (`tracker`, `signer`, …). `unauthenticated` in insecure development mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// An operator action: its name (`approve`, `pause`, `resume`, `abort`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// An operator action that was refused (no such rollout, not allowed, …).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
    /// A rejection's code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<RejectCode>,
    /// Why: a rejection's or a halt's reason, a refused action's, a host's rollback's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The archive a release step is about (BLAKE3, hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    /// An approval for some hosts only: the label selector they were picked by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<crate::Selector>,
}

impl HistoryEntry {
    /// An entry of `kind` at `at`, every other field empty.
    pub fn new(kind: HistoryKind, at: OffsetDateTime) -> HistoryEntry {
        HistoryEntry {
            at,
            kind,
            app: None,
            version: None,
            ring: None,
            agent: None,
            actor: None,
            action: None,
            refused: false,
            code: None,
            reason: None,
            blake3: None,
            target: None,
        }
    }
}

/// What a history entry records. Its name (serde's) is the last part of its subject.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum HistoryKind {
    /// CI or an operator announced an archive (`fleetcast publish`).
    #[serde(rename = "release.published")]
    ReleasePublished,
    /// The watcher validated a package (dropped or published).
    #[serde(rename = "package.detected")]
    PackageDetected,
    /// The watcher refused a package.
    #[serde(rename = "package.rejected")]
    PackageRejected,
    #[serde(rename = "release.signed")]
    ReleaseSigned,
    /// The signer or the distributor refused a release.
    #[serde(rename = "release.rejected")]
    ReleaseRejected,
    /// Every chunk is stored: the release can roll out.
    #[serde(rename = "release.stored")]
    ReleaseStored,
    /// A service refused an event it could not decode or that broke the contract.
    #[serde(rename = "event.rejected")]
    EventRejected,
    /// An operator asked for a rollback (`fleetcast rollback`).
    #[serde(rename = "rollback.requested")]
    RollbackRequested,
    /// The signer issued the rollback directive.
    #[serde(rename = "rollback.signed")]
    RollbackSigned,
    #[serde(rename = "rollout.started")]
    RolloutStarted,
    /// A ring's desired state was written: its hosts may switch.
    #[serde(rename = "ring.started")]
    RingStarted,
    /// Enough of a ring's hosts run the version: the next ring may start.
    #[serde(rename = "ring.completed")]
    RingCompleted,
    /// Too many hosts failed: the rollout stopped where it was (`reason`).
    #[serde(rename = "rollout.halted")]
    RolloutHalted,
    #[serde(rename = "rollout.completed")]
    RolloutCompleted,
    #[serde(rename = "rollout.aborted")]
    RolloutAborted,
    /// A newer release replaced the rollout before it completed.
    #[serde(rename = "rollout.superseded")]
    RolloutSuperseded,
    /// A host's update failed its health gate and the host went back by itself.
    #[serde(rename = "host.rolled_back")]
    HostRolledBack,
    /// An operator's action (`action`), done or `refused`.
    #[serde(rename = "operator.action")]
    OperatorAction,
    /// The tracker's replacement hook was called for a host offline or stuck too long (or,
    /// in dry run, would have been); `reason` says why and how the call ended.
    #[serde(rename = "host.replaced")]
    HostReplaced,
    /// The tracker asked a host stuck behind its ring to retry now or to restart its agent
    /// (`reason` says which and why).
    #[serde(rename = "host.remedied")]
    HostRemedied,
}

impl HistoryKind {
    pub const ALL: [HistoryKind; 20] = [
        HistoryKind::ReleasePublished,
        HistoryKind::PackageDetected,
        HistoryKind::PackageRejected,
        HistoryKind::ReleaseSigned,
        HistoryKind::ReleaseRejected,
        HistoryKind::ReleaseStored,
        HistoryKind::EventRejected,
        HistoryKind::RollbackRequested,
        HistoryKind::RollbackSigned,
        HistoryKind::RolloutStarted,
        HistoryKind::RingStarted,
        HistoryKind::RingCompleted,
        HistoryKind::RolloutHalted,
        HistoryKind::RolloutCompleted,
        HistoryKind::RolloutAborted,
        HistoryKind::RolloutSuperseded,
        HistoryKind::HostRolledBack,
        HistoryKind::OperatorAction,
        HistoryKind::HostReplaced,
        HistoryKind::HostRemedied,
    ];
}

impl std::fmt::Display for HistoryKind {
    /// Serde's name (`rollout.halted`): the subject's last part, the API's and CLI's filter.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::wire_name(self))
    }
}

impl std::str::FromStr for HistoryKind {
    type Err = UnknownHistoryKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
            UnknownHistoryKind {
                given: s.to_string(),
            }
        })
    }
}

/// A history kind no entry has (a filter's typo).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown history kind {given:?}; one of {}", HistoryKind::ALL.map(|k| k.to_string()).join(", "))]
pub struct UnknownHistoryKind {
    pub given: String,
}

#[cfg(test)]
mod tests {
    use super::RejectCode;

    /// Display (logs, notes, the CLI) spells each code as serde does (events, schemas).
    #[test]
    fn reject_codes_have_one_spelling() {
        assert_eq!(RejectCode::PathTraversal.to_string(), "path_traversal");
        assert_eq!(
            RejectCode::RollbackFromNotLatest.to_string(),
            "rollback_from_not_latest"
        );
        assert_eq!(RejectCode::DiskFull.to_string(), "disk_full");
    }

    /// Every kind reads back from its name, and names are distinct subject parts.
    #[test]
    fn history_kinds_round_trip_through_their_names() {
        let mut names = std::collections::BTreeSet::new();
        for kind in super::HistoryKind::ALL {
            let name = kind.to_string();
            assert!(
                name.contains('.') && !name.contains(['*', '>', ' ']),
                "{name}"
            );
            assert_eq!(name.parse::<super::HistoryKind>(), Ok(kind));
            assert!(names.insert(name));
        }
        assert!("rollout.exploded".parse::<super::HistoryKind>().is_err());
    }
}
