//! Slow retrieval (docs/threat-model.md): the agent's link to the store trickles the server's
//! bytes, as a congested or malicious mirror would. Every chunk fetch is a direct get bounded by
//! `nats.request_timeout`, so the update fails, is reported and retried, and nothing running is
//! touched; once the bytes flow again the agent converges, resuming what it had staged.

use std::path::Path;
use std::time::Duration;

use fleetcast_agent::journal::{Journal, Step};
use fleetcast_e2e::{Pipeline, eventually, running, script_app};
use fleetcast_events::v1::{AgentHeartbeat, AgentStatus, AppState};
use fleetcast_harness::fixtures::pseudo_random;
use fleetcast_harness::proxy::Proxy;
use semver::Version;
use time::OffsetDateTime;

const AGENT: &str = "slow-1";
/// What the store sends the agent while throttled: a 256 KiB chunk would take a minute.
const TRICKLE: u64 = 4 * 1024;

fn v(s: &str) -> Version {
    Version::parse(s).expect("version")
}

/// The app's process as the agent recorded it (`app.pid`: "<pid> <start time>").
fn app_process(app_dir: &Path) -> String {
    std::fs::read_to_string(app_dir.join("app.pid"))
        .expect("pid file")
        .trim()
        .to_string()
}

fn alive(process: &str) -> bool {
    let pid = process.split_whitespace().next().expect("pid");
    Path::new("/proc").join(pid).exists()
}

/// Waits for the agent to report that its update to `version` failed after `after`.
async fn failure(p: &Pipeline, version: &str, after: OffsetDateTime) -> AgentStatus {
    let want = v(version);
    p.wait_status(move |s: &AgentStatus| {
        s.agent_id == AGENT
            && s.state == AppState::Failed
            && s.version.as_ref() == Some(&want)
            && s.at > after
    })
    .await
    .expect("the failed update is reported")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_trickles_bytes_delays_the_update_but_never_half_installs_it() {
    let mut p = Pipeline::start().await.expect("pipeline");
    // The agent reaches NATS, and so the chunk store, only through the proxy.
    let proxy = Proxy::start(p.nats.addr()).await.expect("proxy");
    let host = tempfile::tempdir().expect("tmp");
    let mut settings = p.agent_settings(AGENT, "default", host.path());
    settings.nats.url = proxy.url();
    settings.nats.request_timeout = Duration::from_secs(1);
    let state = host.path().join("state");
    let app_dir = host.path().join("data/apps/shapp");
    let committed =
        |version: &str| Journal::load(&app_dir).expect("journal").committed == Some(v(version));

    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    p.desire("shapp", "default", "1.0.0").await;
    p.start_agent(settings);
    eventually("1.0.0 running", || running(&state) == "1.0.0").await;
    eventually("1.0.0 committed", || committed("1.0.0")).await;
    let v1_process = app_process(&app_dir);

    // The store slows to a trickle; 2.0.0 brings 2 MiB the host does not have.
    proxy.throttle(Some(TRICKLE));
    let throttled_at = OffsetDateTime::now_utc();
    let blob = pseudo_random(2 << 20, 2718);
    let v2 = script_app("2.0.0", true).file("data/blob", blob.clone(), 0o644);
    p.release("shapp", "2.0.0", &v2).await;
    p.desire("shapp", "default", "2.0.0").await;

    // The fetches time out: the agent reports the failure, then tries again and fails again
    // (it neither hangs on a trickling fetch nor gives up).
    let first = failure(&p, "2.0.0", throttled_at).await;
    let reason = first.reason.clone().unwrap_or_default();
    assert!(reason.contains("will retry"), "{reason}");
    let second = failure(&p, "2.0.0", first.at).await;
    eprintln!(
        "under the trickle: {:?} then {:?}",
        first.reason, second.reason
    );

    // The fleet hears it from the heartbeats too: 1.0.0 runs, 2.0.0 is staged.
    let beat: AgentHeartbeat = p
        .wait_status(move |b: &AgentHeartbeat| b.agent_id == AGENT && b.at > second.at)
        .await
        .expect("heartbeat");
    assert_eq!(beat.apps[0].running, Some(v("1.0.0")), "{beat:?}");
    assert_eq!(beat.apps[0].staged, Some(v("2.0.0")), "{beat:?}");

    // Meanwhile nothing was half-installed and nothing running was touched.
    let j = Journal::load(&app_dir).expect("journal");
    assert_eq!(j.committed, Some(v("1.0.0")));
    assert_eq!(j.step, Step::Staging { target: v("2.0.0") });
    assert!(
        !j.is_refused(&v("2.0.0")),
        "a slow store is no reason to refuse"
    );
    assert_eq!(
        std::fs::read_link(app_dir.join("current")).expect("current"),
        Path::new("versions/1.0.0")
    );
    assert!(
        !app_dir.join("versions/2.0.0").exists(),
        "2.0.0 installed from a store that never delivered it"
    );
    assert_eq!(running(&state), "1.0.0");
    assert_eq!(app_process(&app_dir), v1_process, "the app was restarted");
    assert!(alive(&v1_process), "the app is not running");

    // The bytes flow again: the next retry gets everything and the agent switches.
    proxy.throttle(None);
    eventually("2.0.0 running", || running(&state) == "2.0.0").await;
    eventually("2.0.0 committed", || committed("2.0.0")).await;
    let j = Journal::load(&app_dir).expect("journal");
    assert_eq!(j.step, Step::Idle);
    assert_eq!(j.previous, Some(v("1.0.0")));
    assert!(!app_dir.join("versions/2.0.0.partial").exists());
    assert_eq!(
        std::fs::read(app_dir.join("versions/2.0.0/data/blob")).expect("blob"),
        blob
    );
    assert_ne!(app_process(&app_dir), v1_process);
    p.stop(&format!("agent-{AGENT}")).await;
}
