//! JSON Schemas of every v1 event and record, generated from the Rust types. The committed copies
//! under `schemas/` are compared with these by a test, so they can never drift.

use schemars::{JsonSchema, Schema, schema_for};

use crate::v1::*;

/// `(file stem, schema)` for every type that crosses the wire or sits in a bucket.
pub fn all() -> Vec<(&'static str, Schema)> {
    fn one<T: JsonSchema>(name: &'static str) -> (&'static str, Schema) {
        (name, schema_for!(T))
    }
    vec![
        one::<ReleasePublished>("release-published"),
        one::<PackageDetected>("package-detected"),
        one::<PackageRejected>("package-rejected"),
        one::<ReleaseSigned>("release-signed"),
        one::<ReleaseRejected>("release-rejected"),
        one::<EventRejected>("event-rejected"),
        one::<ReleaseStored>("release-stored"),
        one::<PatchesWanted>("patches-wanted"),
        one::<RollbackRequested>("rollback-requested"),
        one::<RollbackSigned>("rollback-signed"),
        one::<ReleaseRecord>("release-record"),
        one::<crate::manifest::Manifest>("manifest"),
        one::<crate::manifest::SignedManifest>("signed-manifest"),
        one::<crate::trust::Root>("root"),
        one::<crate::trust::Timestamp>("timestamp"),
        one::<crate::trust::SignedMetadata>("signed-metadata"),
        one::<DesiredState>("desired-state"),
        one::<SlotRequest>("slot-request"),
        one::<SlotReply>("slot-reply"),
        one::<AgentStatus>("agent-status"),
        one::<AgentHeartbeat>("agent-heartbeat"),
        one::<AgentRemedy>("agent-remedy"),
        one::<HistoryEntry>("history-entry"),
        one::<crate::tracker::Command>("tracker-command"),
        one::<crate::tracker::Reply>("tracker-reply"),
        one::<crate::tracker::RolloutSummary>("rollout-summary"),
        one::<crate::tracker::TimelineView>("rollout-timeline"),
        one::<crate::tracker::AgentSummary>("agent-summary"),
        one::<crate::tracker::Laggard>("laggard"),
        one::<crate::tracker::ReleaseSummary>("release-summary"),
        one::<crate::tracker::AppReleases>("app-releases"),
    ]
}

/// Pretty JSON as committed, with a final newline.
pub fn render(schema: &Schema) -> String {
    serde_json::to_string_pretty(schema).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// Fails when a committed schema differs from the types. To regenerate after an intended
    /// change: `FLEETCAST_BLESS=1 cargo test -p fleetcast-events schemas`.
    #[test]
    fn schemas_match_committed_files() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
        let bless = std::env::var_os("FLEETCAST_BLESS").is_some();
        let mut stale = Vec::new();
        for (name, schema) in super::all() {
            let path = dir.join(format!("{name}.schema.json"));
            let want = super::render(&schema);
            if bless {
                std::fs::write(&path, &want).expect("write schema");
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(want.as_str()) {
                stale.push(name);
            }
        }
        assert!(
            stale.is_empty(),
            "schemas out of date: {stale:?}; run FLEETCAST_BLESS=1 cargo test -p fleetcast-events schemas"
        );
    }

    /// The examples under `schemas/examples/` (what CI and operators copy) decode as the types.
    #[test]
    fn examples_decode() {
        use crate::v1::{PackageRejected, ReleasePublished, ReleaseRejected};
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas/examples");
        let read = |name: &str| std::fs::read(dir.join(name)).expect("example file");
        let published: ReleasePublished =
            serde_json::from_slice(&read("release-published.json")).expect("release-published");
        assert_eq!(published.app, "collector");
        let _: PackageRejected =
            serde_json::from_slice(&read("package-rejected.json")).expect("package-rejected");
        let _: ReleaseRejected =
            serde_json::from_slice(&read("release-rejected.json")).expect("release-rejected");
    }
}
