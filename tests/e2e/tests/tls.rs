//! Every connection over TLS, configured in one place (`nats.tls`): with a server that takes
//! only TLS connections from clients whose certificate its CA signed, a release goes through
//! the pipeline and the tracker to an agent; a client without TLS, or without a certificate,
//! is turned away. The certificates are made by the test.

use std::time::Duration;

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
