//! Closed by default: nats-server started from the shipped `ops/nats/secure.conf` (only its
//! port, store and `./auth/` includes rewritten by the harness), with the operator, accounts
//! and TLS material `ops/nats/gen-accounts --tls` issues. Nobody gets in without credentials
//! and the deployment's CA; CI's credential can upload and announce a release and nothing
//! more; and a fleetcast program given no credentials refuses to start rather than run open.

use fleetcast_e2e::checks::{
    assert_anonymous_refused, assert_chunks_kept, assert_only_verified_clients_admitted,
    ci_publishes, closed_pipeline, stream_messages,
};
use fleetcast_e2e::{Pipeline, TIMEOUT, Violations, admitted, eventually, script_app, with_creds};
use fleetcast_events::names;
use fleetcast_harness::accounts::AgentSpec;

/// An anonymous client is refused at connect, over TLS or not; a client with valid
/// credentials is refused without TLS and when it does not trust the deployment's CA (the
/// server's certificate is not one it can verify, as an impostor's would be to it); the same
/// client with the CA gets in (so the refusals are the server's, not a broken setup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_server_config_refuses_anonymous_plaintext_and_unverified_clients() {
    let p = Pipeline::new_closed(&[]).await.expect("pipeline");
    let accounts = p.accounts.as_ref().expect("accounts");
    let ca = accounts.ca().expect("the accounts were issued with TLS");
    assert_only_verified_clients_admitted(&p.nats, &ca, &accounts.creds("ci"), "the server").await;
}

/// A service given no credentials (or no TLS) and no `insecure_dev` does not start: it fails
/// at once with an error naming what is missing and the setting that would allow it, before
/// it connects anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_credentials_or_tls_refuses_to_start() {
    let p = Pipeline::new_closed(&[]).await.expect("pipeline");
    let closed = p.signer_settings();
    assert!(
        !closed.nats.insecure_dev && closed.nats.credentials.is_some() && closed.nats.tls.is_some(),
        "the pipeline's own settings are the closed ones: {:?}",
        closed.nats
    );
    for (what, nats) in [
        (
            "no nats.credentials",
            fleetcast_runtime::NatsSettings {
                credentials: None,
                ..closed.nats.clone()
            },
        ),
        (
            "no nats.tls.ca_file",
            fleetcast_runtime::NatsSettings {
                tls: None,
                ..closed.nats.clone()
            },
        ),
    ] {
        let settings = fleetcast_signer::Settings {
            nats,
            ..closed.clone()
        };
        let token = tokio_util::sync::CancellationToken::new();
        let result = tokio::time::timeout(TIMEOUT, fleetcast_signer::run(settings, token))
            .await
            .expect("fails at once, without waiting for anything");
        let e = result.expect_err("refuses to start").to_string();
        assert!(e.contains(what) && e.contains("nats.insecure_dev"), "{e}");
    }
}

/// CI's credential, against the shipped configuration with the services each under its own
/// identity (none with `insecure_dev`): it uploads a release into the incoming store and
/// announces it (`release.published`), and the release is stored. It cannot write any
/// desired state, purge or delete a stream, or announce a release as signed: each is refused
/// by the server, and the stores show no effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ci_credential_uploads_and_announces_and_does_nothing_else() {
    let p = closed_pipeline(&[AgentSpec::new("h1", "default", &["shapp"])]).await;

    let ci = p.bus_as("ci").await.expect("ci connects");
    let dir = tempfile::tempdir().expect("tmp");
    let zip = dir.path().join("shapp-1.0.0.zip");
    script_app("1.0.0", true).write_to(&zip).expect("zip");
    ci_publishes(&ci, &zip, "shapp", "1.0.0").await;

    let admin = p.bus().await.expect("admin");
    let releases_before = stream_messages(&admin.releases_stream).await;
    assert_eq!(
        p.count_events(names::RELEASE_SIGNED).await.expect("count"),
        1
    );

    // The same credential on a plain client that records what the server refuses.
    let accounts = p.accounts.as_ref().expect("accounts");
    let (client, violations) = p.client_as(&accounts.creds("ci"), None).await;
    let desired_key = format!("$KV.{}.shapp.default", names::DESIRED_BUCKET);
    for subject in [
        desired_key.clone(),
        names::RELEASE_SIGNED.to_string(),
        format!("$JS.API.STREAM.PURGE.{}", names::RELEASES_STREAM),
        format!("$JS.API.STREAM.PURGE.KV_{}", names::DESIRED_BUCKET),
        format!("$JS.API.STREAM.DELETE.{}", names::CHUNKS_STREAM),
        format!("$JS.API.STREAM.DELETE.{}", names::RELEASES_STREAM),
    ] {
        client
            .publish(subject.clone(), "{}".into())
            .await
            .expect("sent");
        violations.publish_refused(&subject).await;
    }
    // Through the JetStream API as the CLI would: each fails.
    assert!(
        tokio::time::timeout(TIMEOUT, async {
            ci.desired()
                .await?
                .store()
                .put("shapp.default", "9.9.9".into())
                .await?;
            anyhow::Ok(())
        })
        .await
        .map_or(true, |r| r.is_err()),
        "writing desired state fails"
    );
    assert!(
        tokio::time::timeout(TIMEOUT, ci.js.delete_stream(names::CHUNKS_STREAM))
            .await
            .map_or(true, |r| r.is_err()),
        "deleting a stream fails"
    );

    // No effect: no desired state, every stream and message still there, one signature.
    assert!(
        admin
            .desired
            .get("shapp.default")
            .await
            .expect("read")
            .is_none(),
        "no desired state was written"
    );
    assert_chunks_kept(&admin).await;
    let releases_after = stream_messages(&admin.releases_stream).await;
    assert!(releases_after >= releases_before, "nothing purged");
    assert_eq!(
        p.count_events(names::RELEASE_SIGNED).await.expect("count"),
        1,
        "no forged release.signed"
    );
}

/// A remote site as shipped (`ops/nats/leaf-site.conf` with the files `gen-accounts --deliver
/// site=…` writes): the site's server takes only authenticated TLS clients, and links to the
/// hub over TLS with the `leaf` credential, which passes on only what agents may do. An agent
/// with its own credential behind it installs a release; an anonymous client is refused at the
/// site; the leaf credential cannot be used as a plain client at the hub (it would speak for
/// every agent); an agent's credential at the site still cannot speak for another agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_behind_a_leaf_node_is_closed_and_its_agent_updates() {
    let (mut p, leaf) =
        Pipeline::new_with_leaf_for(&[AgentSpec::new("site-1", "canary", &["shapp"])])
            .await
            .expect("hub and leaf");
    p.start_pipeline_as_roles();
    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    let host = tempfile::tempdir().expect("tmp");
    let mut settings = p.agent_settings("site-1", "canary", host.path());
    settings.nats = fleetcast_runtime::NatsSettings {
        url: leaf.url(),
        ..p.agent_nats_settings("site-1")
    };
    assert!(!settings.nats.insecure_dev);
    p.start_agent(settings);
    let state = host.path().join("state");
    p.desire("shapp", "canary", "1.0.0").await;
    eventually("site-1 runs 1.0.0 through the leaf", || {
        fleetcast_e2e::running(&state) == "1.0.0"
    })
    .await;

    let accounts = p.accounts.as_ref().expect("accounts");
    let ca = accounts.ca().expect("ca");
    assert_anonymous_refused(&leaf.url(), &ca, "the site").await;
    let leaf_as_client = with_creds(&accounts.creds("leaf"))
        .await
        .require_tls(true)
        .add_root_certificates(ca.clone());
    assert!(
        !admitted(leaf_as_client, &p.nats.url()).await,
        "the leaf credential as a plain client at the hub"
    );

    let violations = Violations::default();
    let agent = violations
        .record(
            with_creds(&accounts.agent_creds("site-1"))
                .await
                .require_tls(true)
                .add_root_certificates(ca)
                .custom_inbox_prefix(fleetcast_harness::accounts::agent_inbox_prefix("site-1")),
        )
        .connect(leaf.url())
        .await
        .expect("the agent's credential connects at the site");
    let forged = names::agent_status_subject("site-2", "canary", "shapp");
    agent
        .publish(forged.clone(), "{}".into())
        .await
        .expect("sent");
    violations.publish_refused(&forged).await;
}
