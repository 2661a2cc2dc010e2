//! The agent end to end: a real pipeline stores releases, the desired state is written to the
//! bucket the agent watches, and the agent supervises real processes through each update.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use fleetcast_agent::journal::Journal;
use fleetcast_agent::settings::AppSettings;
use fleetcast_e2e::{Pipeline, TIMEOUT, script_app};
use semver::Version;
use tokio_util::sync::CancellationToken;

fn v(s: &str) -> Version {
    Version::parse(s).expect("version")
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn running(state: &Path) -> String {
    std::fs::read_to_string(state.join("running"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A running agent; `stop` waits until it has stopped its app (no stray processes).
struct Agent(CancellationToken, tokio::task::JoinHandle<()>);

impl Agent {
    async fn stop(self) {
        self.0.cancel();
        self.1.await.expect("agent task");
    }
}

fn start_agent(p: &Pipeline, data: &Path, state: &Path) -> Agent {
    let health = fleetcast_agent::health::HealthGate {
        stay_up: Duration::from_millis(500),
        ..Default::default()
    };
    let settings = fleetcast_agent::Settings {
        nats: p.nats_settings(),
        agent_id: "host-1".into(),
        data_dir: data.to_path_buf(),
        trusted_keys: vec![p.key.public().to_text()],
        heartbeat: Duration::from_secs(1),
        apps: vec![AppSettings {
            name: "shapp".into(),
            command: vec!["bin/run".into()],
            env: BTreeMap::from([("STATE_DIR".to_string(), state.display().to_string())]),
            health,
            crash: Default::default(),
            grace: Duration::from_secs(5),
        }],
        ..Default::default()
    };
    let token = CancellationToken::new();
    let t = token.clone();
    Agent(
        token,
        tokio::spawn(async move { fleetcast_agent::run(settings, t).await.expect("agent") }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_updates_rolls_back_a_crashing_version_and_converges_after_being_offline() {
    let p = Pipeline::start().await.expect("pipeline");
    let host = tempfile::tempdir().expect("tmp");
    let (data, state) = (host.path().join("data"), host.path().join("state"));
    std::fs::create_dir_all(&state).expect("state");
    let journal = data.join("apps/shapp/journal.json");

    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    p.desire("shapp", "default", "1.0.0").await;
    let agent = start_agent(&p, &data, &state);
    eventually("v1 running", || running(&state) == "1.0.0").await;

    // Happy path: v2 replaces v1, v1 is kept as previous.
    p.release("shapp", "2.0.0", &script_app("2.0.0", true))
        .await;
    p.desire("shapp", "default", "2.0.0").await;
    eventually("v2 committed", || {
        Journal::load(&journal).is_ok_and(|j| j.committed == Some(v("2.0.0")))
    })
    .await;
    assert_eq!(running(&state), "2.0.0");
    let j = Journal::load(&journal).expect("journal");
    assert_eq!(j.previous, Some(v("1.0.0")));
    assert!(data.join("apps/shapp/versions/1.0.0").is_dir());

    // A version that crashes at start is rolled back with its reason and never retried.
    p.release("shapp", "3.0.0", &script_app("3.0.0", false))
        .await;
    p.desire("shapp", "default", "3.0.0").await;
    eventually("v3 refused", || {
        Journal::load(&journal).is_ok_and(|j| j.is_refused(&v("3.0.0")))
    })
    .await;
    let j = Journal::load(&journal).expect("journal");
    assert_eq!(j.committed, Some(v("2.0.0")));
    let reason = &j.refused.iter().next().expect("refused").1;
    assert!(reason.contains("code Some(3)"), "{reason}");
    eventually("v2 running again", || running(&state) == "2.0.0").await;

    // Offline while v4 is announced: converges when it comes back, without any resend.
    agent.stop().await;
    p.release("shapp", "4.0.0", &script_app("4.0.0", true))
        .await;
    p.desire("shapp", "default", "4.0.0").await;
    std::fs::remove_file(state.join("running")).expect("reset marker");
    let agent = start_agent(&p, &data, &state);
    eventually("v4 after restart", || running(&state) == "4.0.0").await;
    eventually("v4 committed", || {
        Journal::load(&journal).is_ok_and(|j| j.committed == Some(v("4.0.0")))
    })
    .await;
    agent.stop().await;
}
