//! Every subject, stream, consumer, bucket and key name in one place. Subjects are versioned
//! (`fleetcast.v1.…`) so a v2 can run beside v1 during an upgrade of fleetcast itself.

use crate::ident::{AgentId, AppName, InvalidName, RingName};

/// CI announces a release whose archive it uploaded to the incoming store (JSON), on
/// `fleetcast.v1.release.published.<user>` ([`release_published_subject`]): every announcement,
/// for a consumer.
pub const RELEASE_PUBLISHED: &str = "fleetcast.v1.release.published.*";
/// The watcher validated an archive and put it in the incoming store.
pub const PACKAGE_DETECTED: &str = "fleetcast.v1.package.detected";
/// The watcher refused an archive (from the drop folder or from CI).
pub const PACKAGE_REJECTED: &str = "fleetcast.v1.package.rejected";
/// The signer signed the release's file manifest.
pub const RELEASE_SIGNED: &str = "fleetcast.v1.release.signed";
/// The signer or the distributor refused a release.
pub const RELEASE_REJECTED: &str = "fleetcast.v1.release.rejected";
/// The distributor stored every chunk and tree node: the release can be announced.
pub const RELEASE_STORED: &str = "fleetcast.v1.release.stored";
/// The tracker asks for binary patches of a stored release from the versions agents run
/// ([`crate::v1::PatchesWanted`]); the distributor makes them.
pub const PATCHES_WANTED: &str = "fleetcast.v1.release.patches_wanted";
/// An operator asks to move an app (or one ring) back to an earlier stored version, on
/// `fleetcast.v1.release.rollback_requested.<user>` ([`rollback_requested_subject`]): every
/// request, for a consumer.
pub const ROLLBACK_REQUESTED: &str = "fleetcast.v1.release.rollback_requested.*";
/// The signer's rollback directive: the earlier version's manifest re-signed to replace later ones.
pub const ROLLBACK_SIGNED: &str = "fleetcast.v1.release.rollback_signed";

/// A service received an event it could not decode or that was not valid.
pub const EVENT_REJECTED: &str = "fleetcast.v1.release.event_rejected";

/// Stream holding the release pipeline's events (published, detected, signed, stored, rejected).
pub const RELEASES_STREAM: &str = "FLEETCAST_RELEASES";
pub const RELEASES_STREAM_SUBJECTS: [&str; 2] =
    ["fleetcast.v1.release.>", "fleetcast.v1.package.>"];

/// Stream of content-addressed chunks: one subject per app and chunk, at most one message per
/// subject, read with direct get so a fetch never creates a consumer on the server.
pub const CHUNKS_STREAM: &str = "FLEETCAST_CHUNKS";
pub const CHUNK_SUBJECT_PREFIX: &str = "fleetcast.v1.chunk.";
/// What the chunks stream captures: `<prefix><app>.<hash>`, and the `<prefix><hash>` subjects
/// fleetcast stored chunks under before they were per app (still kept, no longer read).
pub const CHUNKS_STREAM_SUBJECTS: &str = "fleetcast.v1.chunk.>";

/// Stream of agent status and heartbeats, kept for a limited age.
pub const STATUS_STREAM: &str = "FLEETCAST_STATUS";
pub const STATUS_STREAM_SUBJECTS: [&str; 1] = ["fleetcast.v1.agent.>"];
/// Every agent's status reports (see [`agent_status_subject`]), for a subscription.
pub const ALL_AGENT_STATUSES: &str = "fleetcast.v1.agent.*.*.status.*";
/// Every agent's heartbeats (see [`agent_heartbeat_subject`]), for a subscription.
pub const ALL_AGENT_HEARTBEATS: &str = "fleetcast.v1.agent.*.*.heartbeat";

/// Archives waiting to be signed and chunked (object store).
pub const INCOMING_BUCKET: &str = "fleetcast-incoming";
/// Release records: state of every app+version through the pipeline, with its signed manifest.
pub const RELEASES_BUCKET: &str = "fleetcast-releases";
/// The signer's own memory: last version signed per app (the "strictly newer" policy).
pub const SIGNER_BUCKET: &str = "fleetcast-signer";
/// Desired version per app and ring, watched by agents.
pub const DESIRED_BUCKET: &str = "fleetcast-desired";
/// The root of trust and freshness, read by every verifier: `root.<N>` holds each root version
/// (operators publish them, signed offline) so a verifier can walk from the root it has to the
/// newest; `timestamp` holds the signer's latest timestamp.
pub const TRUST_BUCKET: &str = "fleetcast-trust";
pub const TIMESTAMP_KEY: &str = "timestamp";

pub fn root_key(version: u64) -> String {
    format!("root.{version}")
}

/// The tracker's inventory: one key per agent, plus the status-stream position it reflects.
pub const FLEET_BUCKET: &str = "fleetcast-fleet";
/// The tracker's rollouts: one key per app (its current or last rollout).
pub const ROLLOUTS_BUCKET: &str = "fleetcast-rollouts";
/// Operators' commands that steer a rollout (request/reply, JSON): approve, pause, resume,
/// abort, on `fleetcast.v1.tracker.command.<user>` ([`tracker_command_subject`]). On a subject
/// of their own so that a credential that may only look (CI's) cannot steer.
pub const TRACKER_COMMAND_PREFIX: &str = "fleetcast.v1.tracker.command.";
/// Questions to the tracker (request/reply, JSON): status, show, history.
pub const TRACKER_QUERY: &str = "fleetcast.v1.tracker.query";
/// Both, for the tracker's subscription.
pub const TRACKER_REQUESTS: &str = "fleetcast.v1.tracker.>";

/// What fleetcast did and who asked (`HistoryEntry`, JSON): every release step and rejection,
/// every rollout and its outcome, every operator action, on
/// `fleetcast.v1.history.<app>.<kind>` ([`history_subject`]; `<kind>` is dotted, e.g.
/// `rollout.halted`). The history stream keeps them for its retention; anyone may subscribe
/// to them as notifications (the tracker's webhooks do).
pub const HISTORY_SUBJECT_PREFIX: &str = "fleetcast.v1.history.";
pub const HISTORY_STREAM: &str = "FLEETCAST_HISTORY";
pub const HISTORY_STREAM_SUBJECTS: &str = "fleetcast.v1.history.>";
/// The app token of an entry about no known app (a package whose name did not parse).
pub const NO_APP: &str = "_";

/// The identity of a request in insecure development mode, where the connection has none:
/// the history then says that nobody is known, rather than trusting a name the client gives.
pub const UNAUTHENTICATED: &str = "unauthenticated";
/// Every app's and agent's slot requests, for the tracker's queue subscription.
pub const SLOT_REQUESTS: &str = "fleetcast.v1.slot.*.*";

/// The prefix of every reply subject the tracker answers (a requester's inbox): a request
/// naming any other reply subject (a KV key's, an event's) is not answered.
pub const INBOX_PREFIX: &str = "_INBOX";

/// Durable consumers: one name per role, so several instances of a role share the work.
pub const WATCHER_CONSUMER: &str = "watcher";
pub const SIGNER_CONSUMER: &str = "signer";
pub const DISTRIBUTOR_CONSUMER: &str = "distributor";
pub const TRACKER_CONSUMER: &str = "tracker";
/// The distributor's consumer of [`PATCHES_WANTED`].
pub const DISTRIBUTOR_PATCHES_CONSUMER: &str = "distributor-patches";
pub const SIGNER_ROLLBACK_CONSUMER: &str = "signer-rollback";
pub const TRACKER_ROLLBACK_CONSUMER: &str = "tracker-rollback";
/// The tracker's consumer of every pipeline event, which it records in the history.
pub const TRACKER_HISTORY_CONSUMER: &str = "tracker-history";

/// The durable consumer of the history stream that forwards entries to the tracker's webhook
/// `name` (a token of letters, digits, `-` and `_`): `webhook-<name>`.
pub fn webhook_consumer(name: &str) -> String {
    format!("webhook-{name}")
}

/// Subject of one chunk of `app`, named by the hex BLAKE3 of its uncompressed content. Per app,
/// so an agent's credential can be allowed the chunks of its own apps only (a direct get names
/// the subject): the same content in two apps is stored twice, dedup works within an app.
pub fn chunk_subject(app: &str, chunk_hex: &str) -> String {
    format!("{CHUNK_SUBJECT_PREFIX}{app}.{chunk_hex}")
}

/// Where `user` (the NATS user of the connection: its credential may publish only on its own
/// name, `ops/nats/gen-accounts`) announces a release.
pub fn release_published_subject(user: &str) -> String {
    format!("{RELEASE_PUBLISHED_PREFIX}{user}")
}

/// [`release_published_subject`] without its user, for [`subject_user`].
pub const RELEASE_PUBLISHED_PREFIX: &str = "fleetcast.v1.release.published.";
/// [`rollback_requested_subject`] without its user, for [`subject_user`].
pub const ROLLBACK_REQUESTED_PREFIX: &str = "fleetcast.v1.release.rollback_requested.";

/// Where `user` asks for a rollback (see [`release_published_subject`]).
pub fn rollback_requested_subject(user: &str) -> String {
    format!("{ROLLBACK_REQUESTED_PREFIX}{user}")
}

/// Where `user` sends steering commands to the tracker (see [`release_published_subject`]).
pub fn tracker_command_subject(user: &str) -> String {
    format!("{TRACKER_COMMAND_PREFIX}{user}")
}

/// The user an identity-bearing subject names ([`release_published_subject`],
/// [`rollback_requested_subject`], [`tracker_command_subject`]): its last token after
/// `prefix`, when it is a valid user name. The server let only that user publish there.
pub fn subject_user<'a>(subject: &'a str, prefix: &str) -> Option<&'a str> {
    let user = subject.strip_prefix(prefix)?;
    validate_user_name(user).ok()?;
    Some(user)
}

/// A NATS user name fleetcast gives a person or CI job (`gen-accounts --person`): the rules of
/// an agent id (one subject token, no wildcard), so it can stand in a subject.
pub fn validate_user_name(user: &str) -> Result<(), InvalidName> {
    validate_agent_id(user).map_err(|e| InvalidName(e.0.replace("agent id", "user name")))
}

/// Where the history entry `kind` about `app` is published (see [`HISTORY_SUBJECT_PREFIX`]).
pub fn history_subject(app: Option<&str>, kind: &str) -> String {
    format!("{HISTORY_SUBJECT_PREFIX}{}.{kind}", app.unwrap_or(NO_APP))
}

/// Where agent `agent_id` asks for a rollout slot for `app` (request/reply, answered by the
/// tracker): `fleetcast.v1.slot.<app>.<agent id>`. An agent's credential may publish only on
/// its own id and apps, so the tracker takes both from here, not from the request's body.
pub fn slot_subject(app: &str, agent_id: &str) -> String {
    format!("fleetcast.v1.slot.{app}.{agent_id}")
}

/// Where agent `agent_id` of `ring` reports on `app`:
/// `fleetcast.v1.agent.<id>.<ring>.status.<app>`. The agent's credential may publish only on
/// its own id, ring and apps (`ops/nats/gen-accounts`), so the subject says who sent a report;
/// the tracker refuses a body that says otherwise.
pub fn agent_status_subject(agent_id: &str, ring: &str, app: &str) -> String {
    format!("fleetcast.v1.agent.{agent_id}.{ring}.status.{app}")
}

/// Where agent `agent_id` of `ring` publishes its heartbeats:
/// `fleetcast.v1.agent.<id>.<ring>.heartbeat` (see [`agent_status_subject`]).
pub fn agent_heartbeat_subject(agent_id: &str, ring: &str) -> String {
    format!("fleetcast.v1.agent.{agent_id}.{ring}.heartbeat")
}

/// The inbox prefix of agent `agent_id`: its requests' replies come back under
/// `_INBOX.<agent id>.`, which its credential alone may read, and which the tracker requires
/// of the agent's slot requests.
pub fn agent_inbox_prefix(agent_id: &str) -> String {
    format!("{INBOX_PREFIX}.{agent_id}")
}

/// Who sent an agent report, and what it is, as its subject says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportSubject {
    pub agent_id: AgentId,
    pub ring: RingName,
    pub kind: ReportKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportKind {
    Heartbeat,
    Status { app: AppName },
}

/// Reads an agent report's subject ([`agent_status_subject`], [`agent_heartbeat_subject`]);
/// `None` for anything else, or a token that is not a valid agent id, ring or app name.
pub fn parse_report_subject(subject: &str) -> Option<ReportSubject> {
    let rest = subject.strip_prefix("fleetcast.v1.agent.")?;
    let tokens: Vec<&str> = rest.split('.').collect();
    let (agent_id, ring, kind) = match tokens.as_slice() {
        [agent_id, ring, "heartbeat"] => (*agent_id, *ring, ReportKind::Heartbeat),
        [agent_id, ring, "status", app] => (
            *agent_id,
            *ring,
            ReportKind::Status {
                app: AppName::try_from(*app).ok()?,
            },
        ),
        _ => return None,
    };
    Some(ReportSubject {
        agent_id: AgentId::try_from(agent_id).ok()?,
        ring: RingName::try_from(ring).ok()?,
        kind,
    })
}

/// The app and agent of a slot request's subject ([`slot_subject`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotSubject {
    pub app: AppName,
    pub agent_id: AgentId,
}

/// Reads a slot request's subject; `None` for anything else or an invalid token.
pub fn parse_slot_subject(subject: &str) -> Option<SlotSubject> {
    let rest = subject.strip_prefix("fleetcast.v1.slot.")?;
    let (app, agent_id) = rest.split_once('.')?;
    Some(SlotSubject {
        app: AppName::try_from(app).ok()?,
        agent_id: AgentId::try_from(agent_id).ok()?,
    })
}

/// Whether `reply` is a plain inbox subject (`_INBOX.<token>...`, no wildcard, no empty
/// token): the only kind of reply subject the tracker answers.
pub fn is_inbox(reply: &str) -> bool {
    reply
        .strip_prefix(INBOX_PREFIX)
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|rest| {
            rest.split('.').all(|token| {
                !token.is_empty()
                    && token
                        .chars()
                        .all(|c| c.is_ascii_graphic() && c != '*' && c != '>')
            })
        })
}

/// Whether `reply` is an inbox of agent `agent_id` (under [`agent_inbox_prefix`]): what a slot
/// request of that agent must name, so that an agent cannot have the tracker write into
/// another's inbox.
pub fn is_agent_inbox(reply: &str, agent_id: &str) -> bool {
    is_inbox(reply)
        && reply
            .strip_prefix(&agent_inbox_prefix(agent_id))
            .is_some_and(|rest| rest.starts_with('.'))
}

/// Key of a release in the releases bucket: `<app>.<version>`. KV keys may not hold
/// `+`, which semver uses for build metadata, so it becomes `_` (never valid in semver).
pub fn release_key(app: &str, version: &semver::Version) -> String {
    format!("{app}.{}", version.to_string().replace('+', "_"))
}

/// Key in the releases bucket of one archive's rejection: `<app>.<version>.<first 16 hex of its
/// BLAKE3>`, the short hash of its object name. The record under [`release_key`] is the
/// version's; a different archive reusing a stored version is refused there without replacing
/// it, so its refusal is kept here, where its publisher (`publish --wait`) and `releases` find
/// it. No version ends in `.<16 hex>` (semver has three numeric parts), so the keys never clash.
pub fn release_rejection_key(app: &str, version: &semver::Version, blake3_hex: &str) -> String {
    let short: String = blake3_hex.chars().take(16).collect();
    format!("{}.{short}", release_key(app, version))
}

/// Object name of an archive in the incoming store. It carries the archive's hash, so a second
/// upload of the same app+version with other content can never overwrite the first.
pub fn archive_object(app: &str, version: &semver::Version, blake3_hex: &str) -> String {
    let short: String = blake3_hex.chars().take(16).collect();
    format!("{app}-{version}-{short}.zip")
}

pub fn desired_key(app: &str, ring: &str) -> String {
    format!("{app}.{ring}")
}

/// Where the server republishes every write of the desired-state bucket (the bucket's
/// `republish` setting), with the entry's revision in the `Nats-Sequence` header: what agents
/// subscribe to. A plain subject, unlike the bucket's own `$KV.…` subjects, which a NATS leaf
/// node does not pass on, so agents behind one would only learn of a write when they read.
pub const DESIRED_SUBJECT_PREFIX: &str = "fleetcast.v1.desired.";

/// The header a KV delete or purge carries its operation in (`DEL`, `PURGE`), on a read of the
/// bucket's stream and on the subject a write is republished on. async-nats reads it but does
/// not export its name.
pub const KV_OPERATION_HEADER: &str = "KV-Operation";

/// Where the server republishes every write of the trust bucket (roots, the timestamp), for
/// the same reason.
pub const TRUST_SUBJECT_PREFIX: &str = "fleetcast.v1.trust.";

/// The subject the desired state of `app` in `ring` is republished on.
pub fn desired_subject(app: &str, ring: &str) -> String {
    format!("{DESIRED_SUBJECT_PREFIX}{}", desired_key(app, ring))
}

/// Agent ids are subject tokens and KV keys (the tracker's inventory): letters, digits, `-`
/// and `_`, at most 128.
pub fn validate_agent_id(id: &str) -> Result<(), InvalidName> {
    let ok = (1..=128).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(InvalidName(format!(
            "agent id {id:?} must be 1-128 characters of letters, digits, '-' and '_'"
        )))
    }
}

/// App names are used in subjects, keys and file names, so they are kept to a safe alphabet.
/// The tracker's remedies for one agent ([`crate::v1::AgentRemedy`]): `<prefix>.<agent id>`.
pub const REMEDY_PREFIX: &str = "fleetcast.v1.remedy";

pub fn remedy_subject(agent_id: &str) -> String {
    format!("{REMEDY_PREFIX}.{agent_id}")
}

/// The prefix of the apps the agent's own releases are published as (one per platform).
pub const AGENT_APP_PREFIX: &str = "fleetcast-agent";

/// The app of the agent's releases for `os` and `arch` (as Rust names them: `linux`,
/// `x86_64`): `fleetcast-agent-linux-x86_64`.
pub fn agent_app(os: &str, arch: &str) -> String {
    format!("{AGENT_APP_PREFIX}-{os}-{arch}")
}

/// Whether `app` is reserved for the agent's own releases.
pub fn is_agent_app(app: &str) -> bool {
    app == AGENT_APP_PREFIX || app.starts_with(&format!("{AGENT_APP_PREFIX}-"))
}

pub fn validate_app_name(app: &str) -> Result<(), InvalidName> {
    validate_name("app", app)
}

/// Ring names share the app names' alphabet: they appear in subjects and keys too.
pub fn validate_ring_name(ring: &str) -> Result<(), InvalidName> {
    validate_name("ring", ring)
}

fn validate_name(kind: &str, name: &str) -> Result<(), InvalidName> {
    let ok_len = (1..=64).contains(&name.len());
    let ok_first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok_rest = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok_len && ok_first && ok_rest {
        Ok(())
    } else {
        Err(InvalidName(format!(
            "{kind} name {name:?} must be 1-64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_key_escapes_build_metadata() {
        let v = semver::Version::parse("1.2.3-rc.1+build.5").expect("valid");
        assert_eq!(release_key("collector", &v), "collector.1.2.3-rc.1_build.5");
    }

    #[test]
    fn report_subjects_name_their_sender() {
        let hb = agent_heartbeat_subject("web-1", "canary");
        assert_eq!(hb, "fleetcast.v1.agent.web-1.canary.heartbeat");
        assert_eq!(
            parse_report_subject(&hb),
            Some(ReportSubject {
                agent_id: crate::AgentId::from_static("web-1"),
                ring: crate::RingName::from_static("canary"),
                kind: ReportKind::Heartbeat
            })
        );
        let st = agent_status_subject("web-1", "canary", "shapp");
        assert_eq!(st, "fleetcast.v1.agent.web-1.canary.status.shapp");
        assert_eq!(
            parse_report_subject(&st),
            Some(ReportSubject {
                agent_id: crate::AgentId::from_static("web-1"),
                ring: crate::RingName::from_static("canary"),
                kind: ReportKind::Status {
                    app: crate::AppName::from_static("shapp")
                }
            })
        );
        for bad in [
            // The subjects before agents' rings and apps were in them.
            "fleetcast.v1.agent.web-1.status",
            "fleetcast.v1.agent.web-1.heartbeat",
            "fleetcast.v1.agent.web-1.canary.status",
            "fleetcast.v1.agent.web-1.canary.heartbeat.x",
            "fleetcast.v1.agent.web-1.canary.status.shapp.x",
            "fleetcast.v1.agent.web-1.Canary.heartbeat",
            "fleetcast.v1.agent.web-1.canary.status.Bad",
            "fleetcast.v1.agent..canary.heartbeat",
            "fleetcast.v1.agent.*.canary.heartbeat",
            "fleetcast.v1.agent.web-1.canary.beat",
            "fleetcast.v1.slot.shapp.web-1",
        ] {
            assert_eq!(parse_report_subject(bad), None, "{bad}");
        }
    }

    #[test]
    fn slot_subjects_name_app_and_agent() {
        let s = slot_subject("shapp", "web-1");
        assert_eq!(s, "fleetcast.v1.slot.shapp.web-1");
        assert_eq!(
            parse_slot_subject(&s),
            Some(SlotSubject {
                app: crate::AppName::from_static("shapp"),
                agent_id: crate::AgentId::from_static("web-1")
            })
        );
        for bad in [
            "fleetcast.v1.slot.shapp",
            "fleetcast.v1.slot.shapp.web-1.x",
            "fleetcast.v1.slot.Shapp.web-1",
            "fleetcast.v1.slot.shapp.",
            "fleetcast.v1.agent.web-1.canary.heartbeat",
        ] {
            assert_eq!(parse_slot_subject(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_inboxes_are_reply_subjects() {
        assert!(is_inbox("_INBOX.abc.1"));
        assert!(is_agent_inbox("_INBOX.web-1.abc.1", "web-1"));
        assert!(!is_agent_inbox("_INBOX.web-2.abc.1", "web-1"));
        assert!(!is_agent_inbox("_INBOX.web-10.abc", "web-1"));
        assert!(!is_agent_inbox("_INBOX.web-1", "web-1"));
        for bad in [
            "$KV.fleetcast-desired.shapp.default",
            "fleetcast.v1.release.stored",
            "_INBOX",
            "_INBOX.",
            "_INBOX..x",
            "_INBOX.>",
            "_INBOX.a.*",
            "_INBOXES.a",
            "x._INBOX.a",
        ] {
            assert!(!is_inbox(bad), "{bad}");
        }
    }

    #[test]
    fn agent_ids() {
        assert!(validate_agent_id("Web_1-a").is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>", &"x".repeat(129)] {
            assert!(validate_agent_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn app_names() {
        assert!(validate_app_name("collector-2").is_ok());
        for bad in ["", "-x", "Upper", "a.b", "a b", "a>", &"x".repeat(65)] {
            assert!(validate_app_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
