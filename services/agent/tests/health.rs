//! The health gate against real processes and a real HTTP endpoint.

use std::time::Duration;

use fleetcast_agent::crash_policy::CrashPolicy;
use fleetcast_agent::health::{GateFailure, HealthGate, run_gate};
use fleetcast_agent::supervisor::Supervisor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

use common::{grace, shell};

/// Serves every request with `status` and `body`; returns the URL.
async fn endpoint(status: &'static str, body: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(reply.as_bytes()).await;
        }
    });
    format!("http://{addr}/health")
}

fn gate(http: Option<String>, command: Option<Vec<String>>) -> HealthGate {
    HealthGate {
        stay_up: Duration::from_millis(300),
        http,
        command,
        probe_timeout: Duration::from_secs(5),
        probe_attempts: 2,
        probe_interval: Duration::from_millis(50),
    }
}

async fn gate_for(script: &str, gate: HealthGate) -> Result<(), GateFailure> {
    let dir = tempfile::tempdir().expect("tmp");
    let sup = Supervisor::new(
        "gated",
        CrashPolicy::default(),
        grace(Duration::from_secs(1)),
    );
    let mut events = sup.subscribe();
    sup.start(shell(dir.path(), script)).await;
    let result = run_gate(&gate, &mut events, dir.path(), &Default::default(), None).await;
    sup.stop().await;
    result
}

#[tokio::test]
async fn a_healthy_version_passes() {
    let url = endpoint("200 OK", "ok").await;
    let ok = vec!["sh".to_string(), "-c".into(), "exit 0".into()];
    let passed = gate_for("sleep 30", gate(Some(url), Some(ok))).await;
    assert!(passed.is_ok(), "{passed:?}");
}

#[tokio::test]
async fn a_crash_during_the_gate_fails_it_with_the_exit_code() {
    let result = gate_for("sleep 0.05; exit 4", gate(None, None)).await;
    assert!(
        matches!(
            result,
            Err(GateFailure::Exited {
                code: Some(4),
                signal: None
            })
        ),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_failing_http_probe_fails_it_with_the_answer() {
    let url = endpoint("503 Service Unavailable", "database unreachable").await;
    match gate_for("sleep 30", gate(Some(url), None)).await {
        Err(GateFailure::Http { detail, .. }) => {
            let detail = detail.to_string();
            assert!(
                detail.contains("503") && detail.contains("database unreachable"),
                "{detail}"
            )
        }
        other => panic!("{other:?}"),
    }
    // Nothing listening at all.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}/health", l.local_addr().expect("addr"))
    };
    assert!(matches!(
        gate_for("sleep 30", gate(Some(closed), None)).await,
        Err(GateFailure::Http { .. })
    ));
}

#[tokio::test]
async fn a_failing_command_probe_fails_it_with_its_output() {
    let bad = vec![
        "sh".to_string(),
        "-c".into(),
        "echo migration pending >&2; exit 2".into(),
    ];
    match gate_for("sleep 30", gate(None, Some(bad))).await {
        Err(GateFailure::Command(detail)) => {
            let detail = detail.to_string();
            assert!(detail.contains("migration pending"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
}
