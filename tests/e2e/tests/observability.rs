//! What operators watch: every service's `/health` and `/metrics`, after real work on a real
//! nats-server, and `/health` turning 503 while a service is cut off from NATS.

use fleetcast_events::AppName;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use fleetcast_e2e::checks::{poll, signer_refuses};
use fleetcast_e2e::{Pipeline, free_addr, script_app};
use fleetcast_events::names::{RELEASE_STORED, ROLLBACK_SIGNED};
use fleetcast_events::v1::{RejectCode, ReleaseStored, RollbackSigned};
use fleetcast_harness::fixtures::sample_package;
use semver::Version;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

fn v(s: &str) -> Version {
    Version::parse(s).expect("version")
}

/// `GET path` → status and body; `None` while nothing answers.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).await.ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    Some((status, body.to_string()))
}

/// Asks `GET path` until the answer satisfies `ok` (a counter is incremented just after the
/// event the test waited for is published, and a server may still be starting).
async fn until(addr: SocketAddr, path: &str, ok: impl Fn(u16, &str) -> bool) -> String {
    poll(Duration::from_millis(100), async || {
        match get(addr, path).await {
            Some((status, body)) if ok(status, &body) => Ok(body),
            answer => Err(format!(
                "{path} on {addr} never became as expected; last answer: {answer:?}"
            )),
        }
    })
    .await
}

/// `/metrics` once it holds every one of `lines`.
async fn metrics_with(addr: SocketAddr, lines: &[String]) -> String {
    until(addr, "/metrics", |status, body| {
        status == 200 && lines.iter().all(|l| body.lines().any(|b| b == l))
    })
    .await
}

/// An agent's series for `shapp`, in `state` on `version` after one update and `rollbacks`
/// rollbacks.
fn app_series(state: &str, version: &str, rollbacks: u64) -> Vec<String> {
    vec![
        format!(
            "fleetcast_agent_app_state{{app=\"shapp\",state=\"{state}\",version=\"{version}\"}} 1"
        ),
        "fleetcast_agent_updates_total{app=\"shapp\"} 1".into(),
        format!("fleetcast_agent_rollbacks_total{{app=\"shapp\"}} {rollbacks}"),
    ]
}

async fn healthy(addr: SocketAddr) {
    until(addr, "/health", |status, body| {
        status == 200 && body == "ok"
    })
    .await;
}

fn spawn<F>(run: impl FnOnce(CancellationToken) -> F, token: &CancellationToken)
where
    F: Future + Send + 'static,
    F::Output: std::fmt::Debug,
{
    let work = run(token.clone());
    tokio::spawn(async move {
        let result = work.await;
        tracing::info!(?result, "service ended");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_services_count_their_work_and_report_health() {
    let mut p = Pipeline::new().await.expect("pipeline");
    let (watcher, signer, distributor) = (free_addr(), free_addr(), free_addr());
    let mut w = p.watcher_settings();
    w.metrics_listen = watcher;
    p.start_watcher_with(w);
    let stop = CancellationToken::new();
    let mut s = p.signer_settings();
    s.metrics_listen = signer;
    spawn(|t| fleetcast_signer::run(s, t), &stop);
    let mut d = p.distributor_settings();
    d.metrics_listen = distributor;
    spawn(|t| fleetcast_distributor::run(d, t), &stop);

    // Two releases stored, one name refused by the watcher, one version refused by the signer,
    // and a rollback from the second release to the first.
    p.release("shapp", "1.0.0", &sample_package("1.0.0")).await;
    std::fs::write(p.drop_dir().join("shapp-latest.zip"), b"not even a zip").expect("drop");
    let refused = signer_refuses(&p, "shapp", "0.9.0", &sample_package("0.9.0")).await;
    assert_eq!(refused.reason.code, RejectCode::VersionNotNewer);
    p.release("shapp", "1.1.0", &sample_package("1.1.0")).await;
    let bus = p.cli().await.expect("bus");
    fleetcast_cli::request_rollback(&bus, &AppName::from_static("shapp"), &v("1.0.0"), None)
        .await
        .expect("rollback requested");
    p.wait_event(ROLLBACK_SIGNED, |e: &RollbackSigned| e.to == v("1.0.0"))
        .await
        .expect("rollback signed");
    let mut stored = Vec::new();
    for version in ["1.0.0", "1.1.0"] {
        let e: ReleaseStored = p
            .wait_event(RELEASE_STORED, |e: &ReleaseStored| e.version == v(version))
            .await
            .expect("stored");
        stored.push(e);
    }
    let new_chunks: u64 = stored.iter().map(|e| e.new_chunks).sum();
    let present: u64 = stored.iter().map(|e| e.chunks - e.new_chunks).sum();
    let new_bytes: u64 = stored.iter().map(|e| e.new_stored_bytes).sum();
    assert!(present > 0, "1.1.0 reuses chunks of 1.0.0");

    let lines = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    metrics_with(
        watcher,
        &lines(&[
            "fleetcast_watcher_packages_detected_total{source=\"drop_folder\"} 3",
            "fleetcast_watcher_packages_detected_total{source=\"ci\"} 0",
            "fleetcast_watcher_packages_rejected_total{code=\"invalid_name\"} 1",
            "fleetcast_watcher_nats_connected 1",
        ]),
    )
    .await;
    metrics_with(
        signer,
        &lines(&[
            "fleetcast_signer_releases_signed_total 2",
            "fleetcast_signer_releases_rejected_total{code=\"version_not_newer\"} 1",
            "fleetcast_signer_rollbacks_signed_total 1",
            "fleetcast_signer_rollbacks_refused_total 0",
            "fleetcast_signer_nats_connected 1",
        ]),
    )
    .await;
    let text = metrics_with(
        distributor,
        &[
            "fleetcast_distributor_releases_stored_total 2".into(),
            format!("fleetcast_distributor_chunks_total{{result=\"stored\"}} {new_chunks}"),
            format!("fleetcast_distributor_chunks_total{{result=\"present\"}} {present}"),
            format!("fleetcast_distributor_stored_bytes_total {new_bytes}"),
            "fleetcast_distributor_ingest_failures_total 0".into(),
            "fleetcast_distributor_nats_connected 1".into(),
        ],
    )
    .await;
    assert!(
        text.contains("# TYPE fleetcast_distributor_releases_stored_total counter"),
        "{text}"
    );
    for (addr, service) in [
        (watcher, "watcher"),
        (signer, "signer"),
        (distributor, "distributor"),
    ] {
        healthy(addr).await;
        let (_, text) = get(addr, "/metrics").await.expect("metrics");
        let build = format!(
            "fleetcast_{service}_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.lines().any(|l| l == build), "{build} in\n{text}");
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_while_a_service_is_cut_off_from_nats() {
    use fleetcast_harness::proxy::Proxy;
    let mut p = Pipeline::new().await.expect("pipeline");
    let proxy = Proxy::start(p.nats.addr()).await.expect("proxy");
    let (distributor, tracker) = (free_addr(), free_addr());
    let stop = CancellationToken::new();
    let mut d = p.distributor_settings();
    d.nats.url = proxy.url();
    d.metrics_listen = distributor;
    spawn(|t| fleetcast_distributor::run(d, t), &stop);
    let mut t = p.tracker_settings();
    t.nats.url = proxy.url();
    t.listen = tracker;
    p.start_tracker_with(t);

    healthy(distributor).await;
    healthy(tracker).await;
    let connected = [
        "fleetcast_distributor_nats_connected 1".to_string(),
        "fleetcast_distributor_releases_stored_total 0".into(),
    ];
    metrics_with(distributor, &connected).await;
    let text = metrics_with(tracker, &["fleetcast_tracker_nats_connected 1".into()]).await;
    assert!(text.contains("# TYPE fleetcast_agents gauge"), "{text}");

    proxy.cut();
    for addr in [distributor, tracker] {
        let body = until(addr, "/health", |status, _| status == 503).await;
        assert_eq!(body, "NATS connection lost; reconnecting");
    }
    metrics_with(
        distributor,
        &["fleetcast_distributor_nats_connected 0".into()],
    )
    .await;
    metrics_with(tracker, &["fleetcast_tracker_nats_connected 0".into()]).await;

    proxy.restore();
    healthy(distributor).await;
    healthy(tracker).await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_asked_to_serves_its_apps_state_version_and_rollbacks() {
    let mut p = Pipeline::start().await.expect("pipeline");
    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    p.release("shapp", "2.0.0", &script_app("2.0.0", false))
        .await;
    let host = tempfile::tempdir().expect("tmp");
    let addr = free_addr();
    let mut settings = p.agent_settings("m1", "canary", host.path());
    settings.metrics_listen = Some(addr);
    p.start_agent(settings);

    p.desire("shapp", "canary", "1.0.0").await;
    let mut lines = app_series("running", "1.0.0", 0);
    lines.push("fleetcast_agent_nats_connected 1".into());
    let text = metrics_with(addr, &lines).await;
    healthy(addr).await;
    // What the install took from the store, against what v1's files weigh.
    let bytes = |kind: &str| -> u64 {
        let prefix = format!(
            "fleetcast_agent_last_update_bytes{{app=\"shapp\",version=\"1.0.0\",kind=\"{kind}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {kind} bytes in\n{text}"))
    };
    let release: usize = script_app("1.0.0", true)
        .files()
        .iter()
        .map(|(_, data)| data.len())
        .sum();
    assert_eq!(bytes("release"), release as u64);
    assert!(bytes("chunks") > 0 && bytes("metadata") > 0);
    assert_eq!(bytes("fetched"), bytes("chunks") + bytes("metadata"));

    // 2.0.0 exits at once: the agent rolls back to 1.0.0 by itself.
    p.desire("shapp", "canary", "2.0.0").await;
    let text = metrics_with(addr, &app_series("rolled_back", "1.0.0", 1)).await;
    assert!(
        text.contains("fleetcast_agent_app_uptime_seconds{app=\"shapp\"} "),
        "{text}"
    );
    // A second failed update right after the first: counted again (both leave the app
    // rolled back on 1.0.0, so the heartbeat alone cannot tell them apart).
    p.release("shapp", "3.0.0", &script_app("3.0.0", false))
        .await;
    p.desire("shapp", "canary", "3.0.0").await;
    let lines = [
        "fleetcast_agent_updates_total{app=\"shapp\"} 1".to_string(),
        "fleetcast_agent_rollbacks_total{app=\"shapp\"} 2".into(),
    ];
    metrics_with(addr, &lines).await;
    let build = format!(
        "fleetcast_agent_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.lines().any(|l| l == build), "{build} in\n{text}");
}
