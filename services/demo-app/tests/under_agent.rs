//! The demo app under a real agent, as an operator would see it: releases go through the real
//! pipeline, `/version` answers from the version the agent switched to, the old version is
//! given its drain time, and unhealthy or crashing releases are rolled back by themselves.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use fleetcast_agent::health::HealthGate;
use fleetcast_agent::journal::Journal;
use fleetcast_agent::settings::AppSettings;
use fleetcast_e2e::{Pipeline, TIMEOUT, eventually};
use fleetcast_events::v1::{AgentStatus, AppState};
use fleetcast_harness::fixtures::PackageBuilder;
use semver::Version;
use tokio_util::sync::CancellationToken;

fn v(s: &str) -> Version {
    Version::parse(s).expect("version")
}

/// `GET /version`'s body, `None` while nothing answers.
fn version_served(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET /version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    Some(response.split("\r\n\r\n").nth(1)?.trim().to_string())
}

async fn serving(port: u16, version: &str) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while version_served(port).as_deref() != Some(version) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{version} never served on {port} (serving {:?})",
            version_served(port)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A release of the demo app: its VERSION file, and `env` for the app in its fleetcast.toml
/// (how a release tells the demo app to misbehave).
fn release(version: &str, env: &[(&str, &str)]) -> PackageBuilder {
    let mut toml = String::from("[env]\n");
    for (k, val) in env {
        toml.push_str(&format!("FLEETCAST_DEMO_APP_{k} = {val:?}\n"));
    }
    PackageBuilder::new()
        .file("VERSION", format!("{version}\n"), 0o644)
        .file("fleetcast.toml", toml, 0o644)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_app_is_updated_drained_and_rolled_back_by_a_real_agent() {
    let p = Pipeline::start().await.expect("pipeline");
    let host = tempfile::tempdir().expect("tmp");
    let marker = host.path().join("drained");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let settings = fleetcast_agent::Settings {
        nats: p.nats_settings(),
        agent_id: "demo-host".into(),
        data_dir: host.path().join("data"),
        trusted_keys: vec![p.key.public().to_text()],
        heartbeat: Duration::from_secs(1),
        apps: vec![AppSettings {
            name: "demo".into(),
            command: vec![env!("CARGO_BIN_EXE_fleetcast-demo-app").into()],
            // The host's settings: the port, and a job that takes a second to finish.
            env: BTreeMap::from([
                ("FLEETCAST_DEMO_APP_PORT".to_string(), port.to_string()),
                ("FLEETCAST_DEMO_APP_DRAIN".to_string(), "1s".to_string()),
                (
                    "FLEETCAST_DEMO_APP_DRAIN_MARKER".to_string(),
                    marker.display().to_string(),
                ),
            ]),
            health: HealthGate {
                stay_up: Duration::from_millis(300),
                http: Some(format!("http://127.0.0.1:{port}/health")),
                probe_interval: Duration::from_millis(100),
                probe_attempts: 20,
                ..Default::default()
            },
            crash: Default::default(),
            grace: Duration::from_secs(10),
            user: None,
            group: None,
            verify_on_start: false,
        }],
        ..Default::default()
    };
    let journal = host.path().join("data/apps/demo");
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { fleetcast_agent::run(settings, shutdown).await }
    });

    p.release("demo", "1.0.0", &release("1.0.0", &[])).await;
    p.desire("demo", "default", "1.0.0").await;
    serving(port, "1.0.0").await;

    // v2: v1 finishes its job (drain marker written by v1 itself), then v2 serves.
    p.release("demo", "2.0.0", &release("2.0.0", &[])).await;
    p.desire("demo", "default", "2.0.0").await;
    serving(port, "2.0.0").await;
    assert_eq!(
        std::fs::read_to_string(&marker).expect("v1 was killed, not drained"),
        "1.0.0"
    );
    eventually("v2 committed", || {
        Journal::load(&journal).is_ok_and(|j| j.committed == Some(v("2.0.0")))
    })
    .await;
    assert_eq!(
        Journal::load(&journal).expect("journal").previous,
        Some(v("1.0.0"))
    );

    // v3 fails its health check, v4 crashes at start: each rolled back with its reason, and
    // v2 serves again.
    for (version, env, why) in [
        ("3.0.0", [("FAIL_HEALTH", "true")], "status 503"),
        ("4.0.0", [("CRASH_AT_START", "true")], "code Some(1)"),
    ] {
        p.release("demo", version, &release(version, &env)).await;
        p.desire("demo", "default", version).await;
        let want = v(version);
        let rolled: AgentStatus = p
            .wait_status(move |s: &AgentStatus| {
                s.state == AppState::RolledBack && s.version.as_ref() == Some(&want)
            })
            .await
            .expect("rolled back");
        let reason = rolled.reason.unwrap_or_default();
        assert!(reason.contains(why), "{version}: {reason}");
        serving(port, "2.0.0").await;
    }
    let j = Journal::load(&journal).expect("journal");
    assert_eq!(j.committed, Some(v("2.0.0")));
    assert!(j.is_refused(&v("3.0.0")) && j.is_refused(&v("4.0.0")));

    shutdown.cancel();
    agent.await.expect("join").expect("agent");
    assert_eq!(version_served(port), None, "the app outlived its agent");
}
