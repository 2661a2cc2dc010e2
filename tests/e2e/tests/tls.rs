//! Every connection over TLS, configured in one place (`nats.tls`): with a server that takes
//! only TLS connections from clients whose certificate its CA signed, a release goes through
//! the pipeline and the tracker to an agent; a client without TLS, or without a certificate,
//! is turned away. The certificates are made by the test.

use std::time::Duration;

use fleetcast_e2e::checks::{poll, tls_connect};
use fleetcast_e2e::{Pipeline, eventually, running, script_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_and_agent_talk_tls_and_clients_without_a_certificate_are_refused() {
    let mut p = Pipeline::new_tls().await.expect("tls pipeline");
    p.start_watcher();
    p.start_signer();
    p.start_distributor("distributor");
    p.start_tracker_with(p.tracker_settings());
    let hosts = tempfile::tempdir().expect("tmp");
    let host = hosts.path().join("h1");
    p.start_agent(p.agent_settings("h1", "default", &host));

    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    let state = host.join("state");
    eventually("the agent runs 1.0.0 over TLS", || {
        running(&state) == "1.0.0"
    })
    .await;

    let pki = p.pki.as_ref().expect("pki");
    let refused = |options: async_nats::ConnectOptions| {
        let url = p.nats.url();
        async move {
            match tokio::time::timeout(Duration::from_secs(10), options.connect(url)).await {
                Ok(Ok(client)) => client.flush().await.is_err(),
                Ok(Err(_)) | Err(_) => true,
            }
        }
    };
    assert!(
        refused(async_nats::ConnectOptions::new()).await,
        "a client without TLS settings is refused"
    );
    assert!(
        refused(
            async_nats::ConnectOptions::new()
                .require_tls(true)
                .add_root_certificates(pki.ca())
        )
        .await,
        "a TLS client without a certificate is refused"
    );
    // The same options with the client certificate: what every fleetcast program does.
    let (cert, key) = pki.pair("client");
    let ok = async_nats::ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(pki.ca())
        .add_client_certificate(cert, key)
        .connect(p.nats.url())
        .await
        .expect("a client with the CA's certificate connects");
    ok.flush().await.expect("flush");
}

/// `GET path` over HTTPS to 127.0.0.1:`port`, trusting only the CA in `ca`: the response.
async fn https_get(port: u16, ca: &std::path::Path, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut tls = tls_connect(port, ca, None).await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut response = String::new();
    tls.read_to_string(&mut response).await?;
    Ok(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tracker_and_every_service_serve_http_over_https_only() {
    let mut p = Pipeline::new().await.expect("pipeline");
    let pki = fleetcast_harness::tls::TestPki::generate().expect("pki");
    let (cert_file, key_file) = pki.pair("server");
    let port = fleetcast_e2e::free_addr().port();
    p.start_tracker_with(fleetcast_tracker::Settings {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        tls: Some(fleetcast_runtime::https::HttpsSettings {
            cert_file,
            key_file,
        }),
        ..p.tracker_settings()
    });
    let health = poll(Duration::from_millis(100), async || {
        match https_get(port, &pki.ca(), "/health").await {
            Ok(r) if r.starts_with("HTTP/1.1 200") => Ok(r),
            other => Err(format!("no HTTPS answer: {other:?}")),
        }
    })
    .await;
    assert!(health.contains("ok"), "{health}");
    let page = https_get(port, &pki.ca(), "/").await.expect("dashboard");
    assert!(page.contains("<title>"), "{page}");

    // In clear, nothing HTTP answers; a client that does not trust the CA is refused.
    let plain = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut answer = Vec::new();
        // The server may close or reset the connection: either way, no HTTP answer.
        if tcp
            .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .is_ok()
        {
            let _ = tcp.read_to_end(&mut answer).await;
        }
        String::from_utf8_lossy(&answer).into_owned()
    };
    assert!(
        !plain.contains("HTTP/1.1 200"),
        "answered in clear: {plain}"
    );
    let other = fleetcast_harness::tls::TestPki::generate().expect("other pki");
    assert!(https_get(port, &other.ca(), "/health").await.is_err());

    // A service's /health and /metrics (all share runtime::observe): the signer's.
    let (cert_file, key_file) = pki.pair("server");
    let metrics = fleetcast_e2e::free_addr();
    p.start_signer_with(fleetcast_signer::Settings {
        metrics_listen: metrics,
        metrics_tls: Some(fleetcast_runtime::https::HttpsSettings {
            cert_file,
            key_file,
        }),
        ..p.signer_settings()
    });
    poll(Duration::from_millis(100), async || {
        match https_get(metrics.port(), &pki.ca(), "/metrics").await {
            Ok(r) if r.contains("fleetcast_signer_build_info") => Ok(()),
            other => Err(format!("no HTTPS metrics: {other:?}")),
        }
    })
    .await;
}
