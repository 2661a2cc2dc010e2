//! The demo app under a real agent, as an operator would see it: releases go through the real
//! pipeline, `/version` answers from the version the agent switched to, the old version is
//! given its drain time, and unhealthy or crashing releases are rolled back by themselves.

use fleetcast_events::AppName;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleetcast_agent::health::HealthGate;
use fleetcast_agent::journal::Journal;
use fleetcast_agent::settings::AppSettings;
use fleetcast_e2e::binaries::binary;
use fleetcast_e2e::checks::status_of;
use fleetcast_e2e::{Pipeline, TIMEOUT, eventually, journal_commits};
use fleetcast_events::v1::{AgentStatus, AppState};
use fleetcast_harness::fixtures::PackageBuilder;
use semver::Version;
use tokio_util::sync::CancellationToken;

fn v(s: &str) -> Version {
    Version::parse(s).expect("version")
}

/// `GET /version`'s body, `None` while nothing answers.
fn version_served(port: u16) -> Option<String> {
    let (_, body) = fleetcast_harness::http::get(port, "/version", None)?;
    Some(body.trim().to_string())
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

/// The agent's settings for the demo app on `port` with the host's `env` (the port added), on
/// the host folder `host`: its health checked on `/health`, its sockets `listen`.
fn demo_agent(
    p: &Pipeline,
    host: &std::path::Path,
    port: u16,
    env: &[(&str, String)],
    listen: Vec<std::net::SocketAddr>,
) -> fleetcast_agent::Settings {
    let mut env: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| (format!("FLEETCAST_DEMO_APP_{k}"), v.clone()))
        .collect();
    env.insert("FLEETCAST_DEMO_APP_PORT".into(), port.to_string());
    fleetcast_agent::Settings {
        nats: p.nats_settings(),
        agent_id: "demo-host".into(),
        data_dir: host.join("data"),
        trusted_keys: vec![p.key.public().to_text()],
        heartbeat: Duration::from_secs(1),
        apps: vec![AppSettings {
            name: AppName::from_static("demo"),
            command: vec![demo_app_bin()],
            env,
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
            listen,
        }],
        ..Default::default()
    }
}

/// A real agent with `settings`, serving 1.0.0 of the demo app on `port`: its shutdown token
/// and task.
async fn agent_on_v1(
    p: &Pipeline,
    settings: fleetcast_agent::Settings,
    port: u16,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), fleetcast_agent::AgentError>>,
) {
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { fleetcast_agent::run(settings, shutdown).await }
    });
    p.release("demo", "1.0.0", &release("1.0.0", &[])).await;
    p.desire("demo", "default", "1.0.0").await;
    serving(port, "1.0.0").await;
    (shutdown, agent)
}

/// A free loopback port (see `fleetcast_harness::free_port`).
fn free_port() -> u16 {
    fleetcast_harness::free_port().expect("free port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_app_is_updated_drained_and_rolled_back_by_a_real_agent() {
    let p = Pipeline::start().await.expect("pipeline");
    let host = tempfile::tempdir().expect("tmp");
    let marker = host.path().join("drained");
    let port = free_port();
    // The host's settings: the port, and a job that takes a second to finish.
    let settings = demo_agent(
        &p,
        host.path(),
        port,
        &[
            ("DRAIN", "1s".into()),
            ("DRAIN_MARKER", marker.display().to_string()),
        ],
        Vec::new(),
    );
    let journal = host.path().join("data/apps/demo");
    let (shutdown, agent) = agent_on_v1(&p, settings, port).await;

    // v2: v1 finishes its job (drain marker written by v1 itself), then v2 serves.
    p.release("demo", "2.0.0", &release("2.0.0", &[])).await;
    p.desire("demo", "default", "2.0.0").await;
    serving(port, "2.0.0").await;
    assert_eq!(
        std::fs::read_to_string(&marker).expect("v1 was killed, not drained"),
        "1.0.0"
    );
    journal_commits(&journal, "2.0.0").await;
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
        let rolled = status_of(&p, AppState::RolledBack, version).await;
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

/// What a steady loop of `GET /version` saw: answers per version, and requests refused or
/// failed.
#[derive(Debug, Default)]
struct Load {
    answered: BTreeMap<String, u64>,
    failed: u64,
}

/// One request after another until `stop`; each waits up to 10 s for its answer (a request
/// queued while no version runs is answered late, not lost).
fn steady_load(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Load> {
    std::thread::spawn(move || {
        let mut load = Load::default();
        while !stop.load(Ordering::Relaxed) {
            let answer =
                fleetcast_harness::http::get(port, "/version", Some(Duration::from_secs(10)))
                    .and_then(|(status, body)| (status == 200).then(|| body.trim().to_string()));
            match answer {
                Some(version) => *load.answered.entry(version).or_default() += 1,
                None => load.failed += 1,
            }
        }
        load
    })
}

/// The demo app under an agent, with or without the socket hand-over (`apps.listen`), under a
/// steady load through an update (v1 → v2) and a rollback (v3 fails its health check → v2).
/// Each version drains for 200 ms and starts 200 ms late, so the switch has a gap to show.
async fn update_and_roll_back_under_load(hand_over: bool) -> Load {
    let p = Pipeline::start().await.expect("pipeline");
    let host = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let listen = if hand_over {
        vec![([127, 0, 0, 1], port).into()]
    } else {
        Vec::new()
    };
    let settings = demo_agent(
        &p,
        host.path(),
        port,
        &[("DRAIN", "200ms".into()), ("START_DELAY", "200ms".into())],
        listen,
    );
    let (shutdown, agent) = agent_on_v1(&p, settings, port).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(port, stop.clone());
    p.release("demo", "2.0.0", &release("2.0.0", &[])).await;
    p.desire("demo", "default", "2.0.0").await;
    serving(port, "2.0.0").await;
    p.release(
        "demo",
        "3.0.0",
        &release("3.0.0", &[("FAIL_HEALTH", "true")]),
    )
    .await;
    p.desire("demo", "default", "3.0.0").await;
    let want = v("3.0.0");
    p.wait_status(move |s: &AgentStatus| {
        s.state == AppState::RolledBack && s.version.as_ref() == Some(&want)
    })
    .await
    .expect("v3 rolled back");
    serving(port, "2.0.0").await;
    stop.store(true, Ordering::Relaxed);
    let load = tokio::task::spawn_blocking(move || load.join().expect("load thread"))
        .await
        .expect("join");
    shutdown.cancel();
    agent.await.expect("join").expect("agent");
    load
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_socket_handed_over_no_request_is_refused_across_an_update_and_a_rollback() {
    let load = update_and_roll_back_under_load(true).await;
    assert_eq!(load.failed, 0, "{load:?}");
    for version in ["1.0.0", "2.0.0", "3.0.0"] {
        assert!(load.answered.contains_key(version), "{load:?}");
    }
}

/// The reference for the test above, so that it can fail: each version binding the port
/// itself, requests made between two versions are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_hand_over_requests_between_two_versions_are_refused() {
    let load = update_and_roll_back_under_load(false).await;
    assert!(load.failed > 0, "{load:?}");
    assert!(load.answered.contains_key("2.0.0"), "{load:?}");
}

/// The demo app's binary, as the agent's config names it.
fn demo_app_bin() -> String {
    binary("fleetcast-demo-app").display().to_string()
}

/// As a host runs it: `fleetcast-launcher` running the agent, which supervises the demo app on
/// a socket it holds. Under a steady load, the agent takes a release of itself: the new agent
/// adopts the running demo app (same process) and its socket, and hands that socket to the
/// demo app's next version. No request is refused or lost throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_updates_itself_while_the_demo_app_keeps_answering() {
    let p = Pipeline::start().await.expect("pipeline");
    let host = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let (agent_bin, launcher_bin) = (binary("fleetcast-agent"), binary("fleetcast-launcher"));
    let data = host.path().join("data");
    let config = host.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "agent_id = \"demo-host\"\ndata_dir = \"{}\"\ntrusted_keys = [\"{}\"]\nheartbeat = \"1s\"\nfetch_delay = \"0s\"\n\
             [self_update]\nqualify = \"20s\"\nsoak = \"1s\"\n\
             [nats]\nurl = \"{}\"\ninsecure_dev = true\n\
             [[apps]]\nname = \"demo\"\ncommand = [\"{}\"]\ngrace = \"10s\"\nlisten = [\"127.0.0.1:{port}\"]\n\
             [apps.env]\nFLEETCAST_DEMO_APP_PORT = \"{port}\"\nFLEETCAST_DEMO_APP_DRAIN = \"200ms\"\n\
             [apps.health]\nstay_up = \"300ms\"\nhttp = \"http://127.0.0.1:{port}/health\"\nprobe_interval = \"100ms\"\nprobe_attempts = 20\n",
            data.display(),
            p.key.public().to_text().trim(),
            p.nats.url(),
            demo_app_bin(),
        ),
    )
    .expect("config");
    let root = host.path().join("launcher");
    let mut launcher = std::process::Command::new(&launcher_bin)
        .arg("--root")
        .arg(&root)
        .arg("--agent")
        .arg(&agent_bin)
        .arg("--")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("launcher");
    p.release("demo", "1.0.0", &release("1.0.0", &[])).await;
    p.desire("demo", "default", "1.0.0").await;
    serving(port, "1.0.0").await;
    let demo_pid = || {
        std::fs::read_to_string(data.join("apps/demo/app.pid"))
            .ok()
            .and_then(|t| t.split_whitespace().next().map(String::from))
    };
    let journal = |app: &str| Journal::load(&data.join("apps").join(app)).ok();
    eventually("demo 1.0.0 committed", || {
        journal("demo").is_some_and(|j| j.committed == Some(v("1.0.0")))
    })
    .await;
    let pid = demo_pid().expect("the demo app's pid");

    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(port, stop.clone());
    let agent_app =
        fleetcast_events::names::agent_app(std::env::consts::OS, std::env::consts::ARCH);
    p.release(
        &agent_app,
        "2.0.0",
        &PackageBuilder::new().file(
            "bin/fleetcast-agent",
            format!("#!/bin/sh\nexec {} \"$@\"\n", agent_bin.display()),
            0o755,
        ),
    )
    .await;
    p.desire(&agent_app, "default", "2.0.0").await;
    eventually("agent 2.0.0 committed", || {
        journal(&agent_app).is_some_and(|j| j.committed == Some(v("2.0.0")))
    })
    .await;
    assert_eq!(demo_pid(), Some(pid), "the demo app was not restarted");
    // The next switch of the demo app goes through the socket the new agent took over.
    p.release("demo", "2.0.0", &release("2.0.0", &[])).await;
    p.desire("demo", "default", "2.0.0").await;
    serving(port, "2.0.0").await;
    stop.store(true, Ordering::Relaxed);
    let load = tokio::task::spawn_blocking(move || load.join().expect("load thread"))
        .await
        .expect("join");
    assert_eq!(load.failed, 0, "{load:?}");
    assert!(
        load.answered.contains_key("1.0.0") && load.answered.contains_key("2.0.0"),
        "{load:?}"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(launcher.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = launcher.wait();
    assert_eq!(version_served(port), None, "the app outlived its launcher");
}
