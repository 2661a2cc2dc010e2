//! Every subject, stream, consumer, bucket and key name in one place. Subjects are versioned
//! (`fleetcast.v1.…`) so a v2 can run beside v1 during an upgrade of fleetcast itself.

/// CI announces a release whose archive it uploaded to the incoming store (JSON).
pub const RELEASE_PUBLISHED: &str = "fleetcast.v1.release.published";
/// The watcher validated an archive and put it in the incoming store.
pub const PACKAGE_DETECTED: &str = "fleetcast.v1.package.detected";
/// The watcher refused an archive (from the drop folder or from CI).
pub const PACKAGE_REJECTED: &str = "fleetcast.v1.package.rejected";
/// The signer signed the release's file manifest.
pub const RELEASE_SIGNED: &str = "fleetcast.v1.release.signed";
/// The signer or the distributor refused a release.
pub const RELEASE_REJECTED: &str = "fleetcast.v1.release.rejected";
/// The distributor stored every chunk and the chunk index: the release can be announced.
pub const RELEASE_STORED: &str = "fleetcast.v1.release.stored";
/// An operator asks to move an app (or one ring) back to an earlier stored version.
pub const ROLLBACK_REQUESTED: &str = "fleetcast.v1.release.rollback_requested";
/// The signer's rollback directive: the earlier version's manifest re-signed to replace later ones.
pub const ROLLBACK_SIGNED: &str = "fleetcast.v1.release.rollback_signed";

/// A service received an event it could not decode or that was not valid.
pub const EVENT_REJECTED: &str = "fleetcast.v1.release.event_rejected";

/// Stream holding the release pipeline's events (published, detected, signed, stored, rejected).
pub const RELEASES_STREAM: &str = "FLEETCAST_RELEASES";
pub const RELEASES_STREAM_SUBJECTS: [&str; 2] =
    ["fleetcast.v1.release.>", "fleetcast.v1.package.>"];

/// Stream of content-addressed chunks: one subject per chunk, at most one message per subject,
/// read with direct get so a fetch never creates a consumer on the server.
pub const CHUNKS_STREAM: &str = "FLEETCAST_CHUNKS";
pub const CHUNK_SUBJECT_PREFIX: &str = "fleetcast.v1.chunk.";

/// Stream of agent status and heartbeats, kept for a limited age.
pub const STATUS_STREAM: &str = "FLEETCAST_STATUS";
pub const STATUS_STREAM_SUBJECTS: [&str; 1] = ["fleetcast.v1.agent.>"];

/// Archives waiting to be signed and chunked (object store).
pub const INCOMING_BUCKET: &str = "fleetcast-incoming";
/// Release records: state of every app+version through the pipeline, with its signed manifest.
pub const RELEASES_BUCKET: &str = "fleetcast-releases";
/// Chunk index of every stored release (transport data, checked against the signed manifest).
pub const INDEX_BUCKET: &str = "fleetcast-index";
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
/// abort. On a subject of their own so that a credential that may only look (CI's) cannot
/// steer.
pub const TRACKER_COMMAND: &str = "fleetcast.v1.tracker.command";
/// Questions to the tracker (request/reply, JSON): status, show.
pub const TRACKER_QUERY: &str = "fleetcast.v1.tracker.query";
/// Both, for the tracker's subscription.
pub const TRACKER_REQUESTS: &str = "fleetcast.v1.tracker.*";
/// Every app's slot requests, for the tracker's queue subscription.
pub const SLOT_REQUESTS: &str = "fleetcast.v1.slot.*";

/// Durable consumers: one name per role, so several instances of a role share the work.
pub const WATCHER_CONSUMER: &str = "watcher";
pub const SIGNER_CONSUMER: &str = "signer";
pub const DISTRIBUTOR_CONSUMER: &str = "distributor";
pub const TRACKER_CONSUMER: &str = "tracker";
pub const SIGNER_ROLLBACK_CONSUMER: &str = "signer-rollback";
pub const TRACKER_ROLLBACK_CONSUMER: &str = "tracker-rollback";

/// Subject of one chunk, named by the hex BLAKE3 of its uncompressed content.
pub fn chunk_subject(chunk_hex: &str) -> String {
    format!("{CHUNK_SUBJECT_PREFIX}{chunk_hex}")
}

/// Rollout slot requests for one app (request/reply, answered by the tracker).
pub fn slot_subject(app: &str) -> String {
    format!("fleetcast.v1.slot.{app}")
}

pub fn agent_status_subject(agent_id: &str) -> String {
    format!("fleetcast.v1.agent.{agent_id}.status")
}

pub fn agent_heartbeat_subject(agent_id: &str) -> String {
    format!("fleetcast.v1.agent.{agent_id}.heartbeat")
}

/// Key of a release in the releases and index buckets: `<app>.<version>`. KV keys may not hold
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

/// Where the server republishes every write of the trust bucket (roots, the timestamp), for
/// the same reason.
pub const TRUST_SUBJECT_PREFIX: &str = "fleetcast.v1.trust.";

/// The subject the desired state of `app` in `ring` is republished on.
pub fn desired_subject(app: &str, ring: &str) -> String {
    format!("{DESIRED_SUBJECT_PREFIX}{}", desired_key(app, ring))
}

/// App names are used in subjects, keys and file names, so they are kept to a safe alphabet.
pub fn validate_app_name(app: &str) -> Result<(), String> {
    let ok_len = (1..=64).contains(&app.len());
    let mut chars = app.chars();
    let ok_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok_rest = app
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok_len && ok_first && ok_rest {
        Ok(())
    } else {
        Err(format!(
            "app name {app:?} must be 1-64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit"
        ))
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
    fn app_names() {
        assert!(validate_app_name("collector-2").is_ok());
        for bad in ["", "-x", "Upper", "a.b", "a b", "a>", &"x".repeat(65)] {
            assert!(validate_app_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
