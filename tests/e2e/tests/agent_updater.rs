//! One app's runner (`fleetcast_agent::updater::AppRunner`) against the real pipeline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fleetcast_agent::Settings;
use fleetcast_agent::settings::AppSettings;
use fleetcast_agent::updater::{AppRunner, UpdateError};
use fleetcast_events::manifest::TreeRoot;
use fleetcast_events::tree::{self, ChunkList, TreeFile};
use fleetcast_events::v1::{AgentStatus, AppState, ChunkRef, DesiredState, UpdateOutcome};
use fleetcast_events::{AppName, FileEntry, Manifest, RingName, SignedManifest};
use fleetcast_runtime::AgentBus;
use semver::Version;
use time::OffsetDateTime;

/// A staging that fails for want of the store (here its chunk index cannot be had, as when
/// a slow store times out) is reported as a failure with its reason, the heartbeat says so
/// too, and nothing is refused or installed: the retry can still succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_staging_failure_is_reported_and_nothing_is_installed() {
    let p = fleetcast_e2e::Pipeline::new().await.expect("pipeline");
    let bus = AgentBus::from_bus(&p.bus().await.expect("bus"))
        .await
        .expect("agent bus");
    let host = tempfile::tempdir().expect("tmp");
    let app = AppSettings {
        name: AppName::from_static("shapp"),
        command: vec!["bin/run".into()],
        env: BTreeMap::new(),
        health: Default::default(),
        crash: Default::default(),
        grace: Duration::from_secs(1),
        user: None,
        group: None,
        verify_on_start: false,
        listen: Vec::new(),
    };
    let settings = Settings {
        agent_id: "unit-1".into(),
        data_dir: host.path().join("data"),
        trusted_keys: vec![p.key.public().to_text()],
        apps: vec![app.clone()],
        ..Default::default()
    };
    let trust = Arc::new(settings.trust().expect("trust"));
    let mut runner = AppRunner::new(app, Arc::new(settings), trust, bus.clone()).expect("runner");
    let version = Version::new(1, 0, 0);
    let now = OffsetDateTime::now_utc();
    // A signed tree never stored: its root cannot be fetched.
    let hash = blake3::hash(b"hi\n").to_hex().to_string();
    let files = [TreeFile {
        entry: FileEntry {
            path: "bin/run".into(),
            mode: 0o755,
            size: 3,
            blake3: hash.clone(),
            link: None,
        },
        chunks: ChunkList::Listed(vec![ChunkRef { id: hash, len: 3 }]),
    }];
    let built = tree::build(&files).expect("tree");
    let manifest = Manifest {
        app: AppName::from_static("shapp"),
        version: version.clone(),
        tree: TreeRoot::of(&built, &files),
        created: now,
        expires: now + time::Duration::hours(1),
        rollback_from: None,
    };
    let desired = DesiredState {
        app: AppName::from_static("shapp"),
        ring: RingName::from_static("default"),
        version: version.clone(),
        manifest: SignedManifest::sign(&manifest, &[&p.key]).expect("sign"),
        slot: false,
    };

    let outcome = runner.apply(&desired).await;
    assert!(
        matches!(outcome, Err(UpdateError::Transient(_))),
        "{outcome:?}"
    );
    let want = version.clone();
    let status: AgentStatus = p
        .wait_status(move |s: &AgentStatus| {
            s.agent_id == "unit-1" && s.state == AppState::Failed && s.version == Some(want.clone())
        })
        .await
        .expect("the failure is reported");
    let reason = status.reason.unwrap_or_default();
    assert!(
        reason.contains("will retry") && reason.contains(&built.root.hash.to_hex()),
        "{reason}"
    );
    let beat = runner.heartbeat();
    assert_eq!(beat.state, AppState::Failed);
    assert_eq!(beat.staged, Some(version.clone()));
    assert_eq!(beat.running, None);
    let last = beat.last_update.expect("the heartbeat repeats the outcome");
    assert_eq!(
        (last.version, last.outcome),
        (version.clone(), UpdateOutcome::Failed)
    );
    assert_eq!(last.reason.unwrap_or_default(), reason);
    assert!(!runner.journal().is_refused(&version));
    assert!(runner.install_root().installed().is_empty());
    assert_eq!(runner.install_root().current(), None);
}
