//! Shared checks of the whole-pipeline tests: waiting for a state, reading what the tracker,
//! the history and the metrics say, and asserting what a client is refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::stream;
use fleetcast_cli::CliBus;
use fleetcast_events::AppName;
use fleetcast_events::names;
use fleetcast_events::tracker::{Command, Phase, Reply, RolloutSummary};
use fleetcast_events::v1::{
    AgentStatus, AppState, ReleasePublished, ReleaseRecord, ReleaseRejected, ReleaseState,
};
use fleetcast_harness::NatsServer;
use fleetcast_harness::accounts::AgentSpec;
use fleetcast_harness::fixtures::PackageBuilder;
use fleetcast_tracker::policy::{AppPolicy, Approval, RingPolicy};

use crate::{Pipeline, TIMEOUT, TestBus, admitted, eventually, rollout_phase, running, script_app};

/// Asks `probe` every `every` until it answers `Ok`, and returns that answer. After
/// [`TIMEOUT`] the test fails with the last `Err`: what was waited for, and what was seen
/// instead.
pub async fn poll<T>(every: Duration, mut probe: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        match probe().await {
            Ok(found) => return found,
            Err(last) => assert!(tokio::time::Instant::now() < deadline, "{last}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Asks `probe` every `every` until what it answers passes `done`, and returns that. After
/// [`TIMEOUT`] the test fails, naming `what` it waited for and showing the last answer.
pub async fn until<T: std::fmt::Debug>(
    every: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    poll(every, async || {
        let answer = probe().await;
        if done(&answer) {
            Ok(answer)
        } else {
            Err(format!("timed out waiting for {what}; last: {answer:#?}"))
        }
    })
    .await
}

/// The shipped secure configuration (`Pipeline::new_closed`) issued for `agents`, with the
/// watcher, signer and distributor each under its own role.
pub async fn closed_pipeline(agents: &[AgentSpec]) -> Pipeline {
    let mut p = Pipeline::new_closed(agents).await.expect("pipeline");
    p.start_pipeline_as_roles();
    p
}

/// Agent `id` of `ring` under its own identity in a folder of its own, and `shapp` 1.0.0
/// released and running on it: the folder and the app's state file.
pub async fn own_agent_runs_first_release(
    p: &mut Pipeline,
    id: &str,
    ring: &str,
) -> (tempfile::TempDir, PathBuf) {
    let host = tempfile::tempdir().expect("tmp");
    let settings = p.agent_settings(id, ring, host.path());
    p.start_agent_as_itself(settings);
    let state = host.path().join("state");
    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    eventually(&format!("{id} runs 1.0.0"), || running(&state) == "1.0.0").await;
    (host, state)
}

/// `shapp`'s rollout policy with automatic approval.
pub fn auto_approved(rings: Vec<RingPolicy>) -> AppPolicy {
    AppPolicy {
        approval: Approval::Auto,
        rings,
    }
}

/// Drops the script app `shapp` `version` (exiting at once unless `healthy`) and waits until
/// its rollout is in `phase`.
pub async fn release_until(
    p: &Pipeline,
    version: &str,
    healthy: bool,
    phase: Phase,
) -> RolloutSummary {
    p.release("shapp", version, &script_app(version, healthy))
        .await;
    rollout_phase(p, phase).await
}

/// An operator's approval of `shapp`'s rollout (of `version`, or whatever it rolls out):
/// the tracker's reply.
pub async fn approve(p: &Pipeline, version: Option<&str>) -> Reply {
    p.tracker_command(&Command::Approve {
        app: AppName::from_static("shapp"),
        version: version.map(|v| v.parse().expect("version")),
        target: None,
    })
    .await
    .expect("approve")
}

/// Waits for an agent's status saying `state` of `version`.
pub async fn status_of(p: &Pipeline, state: AppState, version: &str) -> AgentStatus {
    let want: semver::Version = version.parse().expect("version");
    p.wait_status(move |s: &AgentStatus| s.state == state && s.version.as_ref() == Some(&want))
        .await
        .unwrap_or_else(|e| panic!("no {state:?} status of {version}: {e}"))
}

/// `fleetcast publish` of `archive`, the announcement claiming it was published by
/// `published_by`.
pub async fn publish(
    bus: &CliBus,
    archive: &Path,
    published_by: Option<&str>,
) -> anyhow::Result<ReleasePublished> {
    fleetcast_cli::publish(
        bus,
        fleetcast_cli::PublishRequest {
            archive,
            app: None,
            version: None,
            published_by: published_by.map(Into::into),
            progress: None,
        },
    )
    .await
}

/// CI's `fleetcast publish --wait` of `archive` (`app` `version`) with `ci`'s identity: the
/// release's record, once it says stored.
pub async fn ci_publishes(ci: &CliBus, archive: &Path, app: &str, version: &str) -> ReleaseRecord {
    publish(ci, archive, Some("ci"))
        .await
        .expect("ci uploads and announces");
    let version = version.parse().expect("version");
    let record = fleetcast_cli::wait_for_release(ci, app, &version, TIMEOUT)
        .await
        .expect("ci reads the record");
    assert_eq!(record.state, ReleaseState::Stored, "{record:?}");
    record
}

/// Drops `package` as `<app>-<version>.zip` (as [`Pipeline::release`] does) and waits for the
/// signer's refusal of `version`.
pub async fn signer_refuses(
    p: &Pipeline,
    app: &str,
    version: &str,
    package: &PackageBuilder,
) -> ReleaseRejected {
    std::fs::create_dir_all(p.drop_dir()).expect("drop dir");
    package
        .write_to(&p.drop_dir().join(format!("{app}-{version}.zip")))
        .expect("drop");
    let want: semver::Version = version.parse().expect("version");
    p.wait_event(names::RELEASE_REJECTED, move |e: &ReleaseRejected| {
        e.version == want
    })
    .await
    .unwrap_or_else(|e| panic!("{version} not refused: {e}"))
}

/// How many messages `stream` holds now.
pub async fn stream_messages(stream: &stream::Stream) -> u64 {
    stream.clone().info().await.expect("info").state.messages
}

/// Whether the server answered `call` (a JetStream API request) with an error; no answer
/// within [`TIMEOUT`] fails the test.
pub async fn api_refuses<T, E>(call: impl Future<Output = Result<T, E>>) -> bool {
    tokio::time::timeout(TIMEOUT, call)
        .await
        .expect("answer or time-out")
        .is_err()
}

/// The chunk stream still exists and holds chunks: nobody deleted or purged it.
pub async fn assert_chunks_kept(admin: &TestBus) {
    let mut chunks = admin
        .js
        .get_stream(names::CHUNKS_STREAM)
        .await
        .expect("the chunk stream still exists");
    assert!(chunks.info().await.expect("info").state.messages > 0);
}

/// Fails the test with every permission violation `server` logged: each role had what it used.
pub fn assert_no_permission_violations(server: &NatsServer) {
    let log = server.log();
    let violations: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Publish Violation") || l.contains("Subscription Violation"))
        .collect();
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

/// An anonymous client is refused at `url`, over TLS trusting `ca` and in plain text; `at`
/// names the place in a failure.
pub async fn assert_anonymous_refused(url: &str, ca: &Path, at: &str) {
    let tls = async_nats::ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(ca.to_path_buf());
    assert!(!admitted(tls, url).await, "{at}: anonymous over TLS");
    assert!(
        !admitted(async_nats::ConnectOptions::new(), url).await,
        "{at}: anonymous, plain"
    );
}

/// What `server`'s client port admits: no anonymous client ([`assert_anonymous_refused`]);
/// not the valid credentials `creds` without trusting the deployment's `ca` (the system roots,
/// or another CA: the server's certificate is not one the client can verify, as an impostor's
/// would be to it); the same credentials trusting `ca`, yes (so the refusals are the server's,
/// not a broken setup). The server logged the refusals. `at` names the server in a failure.
pub async fn assert_only_verified_clients_admitted(
    server: &NatsServer,
    ca: &Path,
    creds: &Path,
    at: &str,
) {
    use crate::with_creds;
    let url = server.url();
    assert_anonymous_refused(&url, ca, at).await;
    assert!(
        !admitted(with_creds(creds).await, &url).await,
        "{at}: no CA"
    );
    let other = fleetcast_harness::tls::TestPki::generate().expect("pki");
    let wrong_ca = with_creds(creds)
        .await
        .require_tls(true)
        .add_root_certificates(other.ca());
    assert!(!admitted(wrong_ca, &url).await, "{at}: another CA");
    let right = with_creds(creds)
        .await
        .require_tls(true)
        .add_root_certificates(ca.to_path_buf());
    assert!(admitted(right, &url).await, "{at}: credentials and the CA");
    let log = server.log();
    assert!(
        log.contains("authentication error") && log.contains("unknown certificate authority"),
        "{at} logged the anonymous and the unverified attempts: {log}"
    );
}

/// A TLS connection to 127.0.0.1:`port` trusting only the CA in `ca`, presenting `client`
/// (certificate and key files) if given.
pub async fn tls_connect(
    port: u16,
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(std::io::Error::other)? {
        roots
            .add(cert.map_err(std::io::Error::other)?)
            .map_err(std::io::Error::other)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(std::io::Error::other)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(std::io::Error::other)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(std::io::Error::other)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(std::io::Error::other)?
        }
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
}
