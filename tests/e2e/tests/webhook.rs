//! The tracker's webhooks against a local HTTP receiver, on the shipped secure NATS
//! configuration with every program under its own identity (`Pipeline::new_closed`): a rollout
//! halts while the receiver is down; once it is up (answering 503 to its first request) it
//! gets the `rollout.halted` entry exactly once, signed, with the halt's reason; a receiver
//! that refuses (410) gets each entry once and is not asked again; a restarted tracker goes
//! on where its webhooks were.

use fleetcast_events::AppName;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use fleetcast_e2e::checks::{
    assert_no_permission_violations, auto_approved, closed_pipeline, poll, until,
};
use fleetcast_e2e::{eventually, ring, running, script_app};
use fleetcast_events::Encoding;
use fleetcast_events::names::{HISTORY_STREAM, history_subject, webhook_consumer};
use fleetcast_events::tracker::Command;
use fleetcast_events::v1::{HistoryEntry, HistoryKind};
use fleetcast_harness::accounts::AgentSpec;
use fleetcast_tracker::webhook::WebhookSettings;
use hmac::{KeyInit, Mac};

const SECRET: &str = "a-test-webhook-secret";

/// One request the receiver got, and what it answered.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
    answered: StatusCode,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    fn entry(&self) -> HistoryEntry {
        serde_json::from_slice(&self.body).expect("the body is a history entry")
    }

    /// The signature checked as a receiver would (docs/operations.md): HMAC-SHA256 of
    /// `<timestamp>.<body>` with the shared secret, computed here, not by the tracker's code.
    fn signature_verifies(&self, secret: &[u8]) -> bool {
        let Some(hex) = self.header("x-fleetcast-signature").strip_prefix("sha256=") else {
            return false;
        };
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("key");
        mac.update(self.header("x-fleetcast-timestamp").as_bytes());
        mac.update(b".");
        mac.update(&self.body);
        let expected: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        hex == expected
    }
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

impl Receiver {
    fn got(&self) -> Vec<Received> {
        self.0.lock().expect("lock").clone()
    }
}

/// `/hook` answers 503 to its first request (one more failure after being down), then 200;
/// `/gone` always 410 (the receiver refuses).
async fn receive(
    State(receiver): State<Receiver>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let mut got = receiver.0.lock().expect("lock");
    let path = uri.path().to_string();
    let answered = match path.as_str() {
        "/gone" => StatusCode::GONE,
        _ if got.iter().all(|r| r.path != path) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::OK,
    };
    got.push(Received {
        path,
        headers,
        body,
        answered,
    });
    answered
}

/// The tracker's count of deliveries to `webhook` with `outcome` (its /metrics on `port`).
fn deliveries(port: u16, webhook: &str, outcome: &str) -> u64 {
    let metrics = fleetcast_e2e::http_get(port, "/metrics");
    let series = format!(
        "fleetcast_tracker_webhook_deliveries_total{{webhook=\"{webhook}\",outcome=\"{outcome}\"}} "
    );
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn wait_deliveries(port: u16, webhook: &str, outcome: &str, at_least: u64) {
    let counted = async || {
        tokio::task::spawn_blocking({
            let (webhook, outcome) = (webhook.to_string(), outcome.to_string());
            // A tracker (re)starting may not listen yet.
            move || match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(_) => deliveries(port, &webhook, &outcome),
                Err(_) => 0,
            }
        })
        .await
        .expect("join")
    };
    until(
        Duration::from_millis(100),
        &format!("{webhook}: {at_least} {outcome}"),
        counted,
        |n| *n >= at_least,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halted_rollout_reaches_a_receiver_that_was_down_once_and_signed() {
    let mut p = closed_pipeline(&[AgentSpec::new("c1", "canary", &["shapp"])]).await;

    // The receiver's port is taken now (bound, so nothing else gets it) but not listened on:
    // connections to it are refused until the receiver comes up.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    let receiver_addr = socket.local_addr().expect("address");
    let secret_file = p.dir.path().join("webhook.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).expect("secret");
    let hook = |name: &str, path: &str| WebhookSettings {
        name: name.into(),
        url: format!("http://{receiver_addr}{path}"),
        secret_file: secret_file.clone(),
        kinds: vec![HistoryKind::RolloutHalted, HistoryKind::OperatorAction],
        apps: vec![AppName::from_static("shapp")],
    };
    let mut settings = p.tracker_settings();
    let port = fleetcast_e2e::free_addr().port();
    settings.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    settings.apps.insert(
        AppName::from_static("shapp"),
        auto_approved(vec![ring("canary", 1, 1)]),
    );
    settings.webhooks = vec![hook("pager", "/hook"), hook("gone", "/gone")];
    p.start_tracker_as_role(settings.clone());
    let hosts = tempfile::tempdir().expect("tmp");
    let agent = p.agent_settings("c1", "canary", &hosts.path().join("c1"));
    p.start_agent_as_itself(agent);

    // A new webhook gets what is recorded from its creation on: wait for its consumer.
    let admin = p.bus().await.expect("admin");
    for name in ["pager", "gone"] {
        poll(Duration::from_millis(100), async || {
            match admin.js.get_stream(HISTORY_STREAM).await {
                Ok(stream) if stream.consumer_info(webhook_consumer(name)).await.is_ok() => Ok(()),
                _ => Err(format!("webhook {name}'s consumer never made")),
            }
        })
        .await;
    }

    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    let state = hosts.path().join("c1").join("state");
    eventually("c1 runs 1.0.0", || running(&state) == "1.0.0").await;
    p.release("shapp", "2.0.0", &script_app("2.0.0", false))
        .await;

    // The rollout halted and its entry was tried, and failed, twice at the receiver that is
    // down (both webhooks: nothing listens).
    wait_deliveries(port, "pager", "failed", 2).await;
    wait_deliveries(port, "gone", "failed", 2).await;
    assert_eq!(deliveries(port, "pager", "delivered"), 0);

    // The receiver comes up.
    let receiver = Receiver::default();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .route("/gone", axum::routing::post(receive))
        .with_state(receiver.clone());
    let listener = socket.listen(64).expect("listen");
    tokio::spawn(async move { axum::serve(listener, app).await });

    wait_deliveries(port, "pager", "delivered", 1).await;
    wait_deliveries(port, "gone", "refused", 1).await;
    // One more entry for both (the operator's action): in order, one at a time, so anything
    // still to come about the halt (a duplicate) would come before it.
    let reply = p
        .tracker_command(&Command::Abort {
            app: AppName::from_static("shapp"),
        })
        .await
        .expect("abort");
    assert!(reply.ok, "{reply:?}");
    wait_deliveries(port, "pager", "delivered", 2).await;
    wait_deliveries(port, "gone", "refused", 2).await;

    // As this tracker process counted them: twice down and once 503, nothing refused; the
    // other receiver only refused.
    assert!(deliveries(port, "pager", "failed") >= 3);
    assert_eq!(deliveries(port, "pager", "refused"), 0);
    assert_eq!(deliveries(port, "gone", "delivered"), 0);

    // A restarted tracker goes on where its webhooks were: an entry recorded while it was
    // stopped (published here as the tracker would) is delivered, and nothing before it again
    // (a consumer made anew would start after it).
    p.stop("tracker").await;
    let mut away = HistoryEntry::new(HistoryKind::RolloutHalted, time::OffsetDateTime::now_utc());
    away.app = Some(AppName::from_static("shapp"));
    away.reason = Some("recorded while the tracker was stopped".into());
    admin
        .publish_event(
            &history_subject(Some("shapp"), "rollout.halted"),
            &away,
            Encoding::Json,
            None,
        )
        .await
        .expect("publish");
    p.start_tracker_as_role(settings);
    // The new process counts from zero.
    wait_deliveries(port, "pager", "delivered", 1).await;
    wait_deliveries(port, "gone", "refused", 1).await;

    let got = receiver.got();
    let hook: Vec<&Received> = got.iter().filter(|r| r.path == "/hook").collect();
    let summary: Vec<(String, u16)> = hook
        .iter()
        .map(|r| (r.entry().kind.to_string(), r.answered.as_u16()))
        .collect();
    assert_eq!(
        summary,
        [
            ("rollout.halted".to_string(), 503),
            ("rollout.halted".to_string(), 200),
            ("operator.action".to_string(), 200),
            ("rollout.halted".to_string(), 200),
        ],
        "the halt once (after one more failure), the action, then what came while stopped"
    );
    assert_eq!(hook[3].entry().reason, away.reason);
    for r in &hook {
        assert!(r.signature_verifies(SECRET.as_bytes()), "{r:?}");
        assert!(!r.signature_verifies(b"another secret"), "{r:?}");
        assert_eq!(r.header("content-type"), "application/json");
        assert!(r.header("x-fleetcast-timestamp").parse::<i64>().is_ok());
    }
    // A retried entry keeps its delivery id (receivers dedupe on it); the next has another.
    let ids: Vec<u64> = hook
        .iter()
        .map(|r| {
            r.header("x-fleetcast-delivery")
                .parse()
                .expect("delivery id")
        })
        .collect();
    assert!(
        ids[0] == ids[1] && ids[2] > ids[1] && ids[3] > ids[2],
        "{ids:?}"
    );
    let halted = hook[1].entry();
    assert_eq!(halted.app.as_deref(), Some("shapp"));
    assert_eq!(halted.version, Some("2.0.0".parse().expect("version")));
    let reason = halted.reason.unwrap_or_default();
    assert!(reason.contains("ring canary"), "{reason}");
    assert_eq!(hook[2].entry().action.as_deref(), Some("abort"));

    // The refusing receiver got each entry once: refused, not asked again.
    let gone: Vec<String> = got
        .iter()
        .filter(|r| r.path == "/gone")
        .map(|r| r.entry().kind.to_string())
        .collect();
    assert_eq!(
        gone,
        ["rollout.halted", "operator.action", "rollout.halted"]
    );

    // The tracker's identity had every permission this takes.
    assert_no_permission_violations(&p.nats);
}
