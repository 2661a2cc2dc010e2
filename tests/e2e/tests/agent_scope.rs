//! What one host's credential reaches, and the quotas that bound what any credential can
//! store. Against a nats-server with the accounts `ops/nats/gen-accounts` issues (one
//! identity per agent, scoped to its ring and apps): an agent installs its app by direct gets
//! and plain subscriptions alone; it cannot ask for stream info or lists (which would show
//! every chunk hash and desired-state key), nor read another app's chunks or index; the
//! server refuses its oversized reports. Every stream and bucket has a byte and message-size
//! limit, and an archive over the limits is refused before it is downloaded.
//!
//! The server runs from the shipped `ops/nats/secure.conf` with the accounts and TLS that
//! `ops/nats/gen-accounts --tls` issues (`Pipeline::new_closed`): what is tested is what ships.

use std::time::Duration;

use fleetcast_e2e::checks::publish;
use fleetcast_e2e::{Pipeline, TIMEOUT, eventually, running, script_app};
use fleetcast_events::names;
use fleetcast_harness::accounts::AgentSpec;
use fleetcast_runtime::agent_bus::DirectChunks;
use fleetcast_runtime::releases::FetchError;
use futures::StreamExt;

fn fleet() -> Vec<AgentSpec> {
    vec![
        AgentSpec::new("h1", "default", &["shapp"]),
        AgentSpec::new("h2", "default", &["otherapp"]),
    ]
}

fn v(s: &str) -> semver::Version {
    semver::Version::parse(s).expect("version")
}

/// The agent's whole job with its own credential, whose scope has no stream info and no
/// consumer: it follows its desired state, walks the trust, fetches its app's index and
/// chunks, installs and runs the version, and reports. The server logs no permission
/// violation at all: everything the agent does, its scope allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_installs_its_app_with_direct_gets_alone() {
    let mut p = Pipeline::new_closed(&fleet()).await.expect("pipeline");
    p.start_pipeline_as_roles();
    let host = tempfile::tempdir().expect("tmp");
    let settings = p.agent_settings("h1", "default", host.path());
    p.start_agent_as_itself(settings);
    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    p.desire("shapp", "default", "1.0.0").await;
    let state = host.path().join("state");
    eventually("h1 runs 1.0.0", || running(&state) == "1.0.0").await;
    // An update reuses what it has and fetches the rest, again by direct get.
    p.release("shapp", "1.1.0", &script_app("1.1.0", true))
        .await;
    p.desire("shapp", "default", "1.1.0").await;
    eventually("h1 runs 1.1.0", || running(&state) == "1.1.0").await;
    let admin = p.bus().await.expect("admin");
    assert!(
        admin
            .status_stream
            .get_last_raw_message_by_subject(&names::agent_heartbeat_subject("h1", "default"))
            .await
            .is_ok(),
        "h1's heartbeats are stored"
    );
    let log = p.nats.log();
    let violations: Vec<&str> = log.lines().filter(|l| l.contains("Violation")).collect();
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

/// With one agent's credential: no stream info (with a subject filter it would list every
/// chunk hash of every app, every desired-state key), no stream list or names, no consumer
/// (which would deliver any subject of a stream), no direct get of another app's chunk (or
/// tree node) nor of a chunk under the subject chunks had before they were per app. Its own
/// app's chunks it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_credential_cannot_list_streams_or_read_another_apps_chunks() {
    let mut p = Pipeline::new_closed(&fleet()).await.expect("pipeline");
    p.start_pipeline_as_roles();
    // The same content in both apps: the same chunk hashes, under each app's own subjects.
    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    p.release("otherapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    let admin = p.bus().await.expect("admin");
    let own = fleetcast_e2e::chunk_ids(&admin, &p.trusted(), "shapp", &v("1.0.0"))
        .await
        .expect("ids");
    let theirs = fleetcast_e2e::chunk_ids(&admin, &p.trusted(), "otherapp", &v("1.0.0"))
        .await
        .expect("ids");
    let chunk = own.iter().next().expect("a chunk").clone();
    assert!(theirs.contains(&chunk), "the apps share content");
    // Stored twice, once per app: dedup stays within an app.
    let stored = admin
        .chunks
        .direct_get_last_for_subject(names::chunk_subject("otherapp", &chunk))
        .await;
    assert!(stored.is_ok(), "otherapp's copy is stored");

    let (h1, refused) = p.agent_client("h1").await;
    let js = async_nats::jetstream::new(h1.clone());

    // What it may: its own app's chunk, by direct get.
    let own_chunks = DirectChunks::new(&js).await.expect("chunks");
    own_chunks
        .get("shapp", &chunk)
        .await
        .expect("h1 reads shapp's chunk");

    // Stream info (plain and with a subject filter, through the client library), listing,
    // names, consumers: each refused by the server.
    assert!(
        tokio::time::timeout(TIMEOUT, js.get_stream(names::CHUNKS_STREAM))
            .await
            .expect("answer or time-out")
            .is_err(),
        "stream info through the library"
    );
    let mut names_listed = js.stream_names();
    assert!(
        tokio::time::timeout(TIMEOUT, names_listed.next())
            .await
            .expect("answer or time-out")
            .is_none_or(|r| r.is_err()),
        "stream names through the library"
    );
    for subject in [
        format!("$JS.API.STREAM.INFO.{}", names::CHUNKS_STREAM),
        format!("$JS.API.STREAM.INFO.KV_{}", names::DESIRED_BUCKET),
        "$JS.API.STREAM.LIST".to_string(),
        "$JS.API.STREAM.NAMES".to_string(),
        "$JS.API.INFO".to_string(),
        format!("$JS.API.CONSUMER.CREATE.{}", names::CHUNKS_STREAM),
        format!("$JS.API.CONSUMER.CREATE.KV_{}", names::DESIRED_BUCKET),
        format!("$JS.API.STREAM.MSG.GET.{}", names::CHUNKS_STREAM),
    ] {
        // A subject filter: what would list every subject of the stream.
        h1.publish(subject.clone(), r#"{"subjects_filter":">"}"#.into())
            .await
            .expect("sent");
        refused.publish_refused(&subject).await;
    }

    // Another app's chunk (the very same content); a chunk under the old subject.
    let direct = |subject: String| format!("$JS.API.DIRECT.GET.{}.{subject}", names::CHUNKS_STREAM);
    for subject in [
        direct(names::chunk_subject("otherapp", &chunk)),
        direct(format!("{}{chunk}", names::CHUNK_SUBJECT_PREFIX)),
        // A bare direct get names no subject: it would serve any message by sequence.
        format!("$JS.API.DIRECT.GET.{}", names::CHUNKS_STREAM),
    ] {
        h1.publish(subject.clone(), "{}".into())
            .await
            .expect("sent");
        refused.publish_refused(&subject).await;
    }
    assert!(
        own_chunks.get("otherapp", &chunk).await.is_err(),
        "the library's direct get of another app's chunk fails"
    );
}

/// One agent cannot fill the JetStream disk with large reports: its role's max payload
/// (64 KiB) makes the server refuse an 8 MiB heartbeat, and one just over the limit (far under
/// the server's own 8 MB), while a normal one is stored. Nothing of the refused ones is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_heartbeat_is_refused_by_the_server_and_nothing_is_stored() {
    let mut p = Pipeline::new_closed(&fleet()).await.expect("pipeline");
    p.start_pipeline_as_roles();
    let admin = p.bus().await.expect("admin");
    let subject = names::agent_heartbeat_subject("h1", "default");
    let (h1, _) = p.agent_client("h1").await;
    // The server announces its own limit (8 MB) to every client, so the client sends; the
    // server checks the role's and cuts the connection (the client reconnects).
    assert_eq!(h1.server_info().max_payload, 8 << 20);
    let mut status = admin.status_stream.clone();
    let before = status.info().await.expect("info").state.clone();

    for size in [8 << 20, (64 << 10) + 1] {
        h1.publish(subject.clone(), vec![b'x'; size].into())
            .await
            .expect("the client sends it");
        h1.flush().await.ok();
        // The server logs each refusal with the role's limit (the client may not hear of it
        // before the connection is cut).
        eventually(&format!("the server refuses {size} bytes"), || {
            let refusals = p
                .nats
                .log()
                .matches(&format!("maximum payload exceeded: {size} vs 65536"))
                .count();
            refusals > 0
        })
        .await;
    }
    // A normal heartbeat (reconnected, if the server cut the client off) is stored, so nothing
    // above would have gone unnoticed.
    // The client may still be reconnecting (with backoff) after the cuts: asked again until
    // the stream acknowledges it.
    let js = async_nats::jetstream::new(h1.clone());
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let small = loop {
        let acked = match js.publish(subject.clone(), vec![b'x'; 1024].into()).await {
            Ok(ack) => ack.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match acked {
            Ok(ack) => break ack,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "a normal heartbeat is stored: {e}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let after = status.info().await.expect("info").state.clone();
    // Only normal ones (one, or more if an acknowledgement was lost and it was asked again):
    // each well under 2 KiB stored, none of the refused sizes.
    let added = after.messages - before.messages;
    assert!(added >= 1, "the normal one is stored");
    assert_eq!(after.last_sequence, small.sequence);
    assert!(after.bytes < before.bytes + added * 2048, "{after:?}");
}

/// Every stream and bucket fleetcast creates has a byte limit and a largest message; the
/// status stream a size besides its age. A message over a stream's limit is refused by the
/// stream (here on a connection without role limits, whose max payload would let it through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_has_quotas_and_refuses_an_oversized_message() {
    let p = Pipeline::new().await.expect("pipeline");
    let bus = p.bus().await.expect("bus");
    let quotas = fleetcast_runtime::settings::StoreQuotas::default();
    let mut seen = 0;
    let mut streams = bus.js.streams();
    while let Some(info) = streams.next().await {
        let info = info.expect("info");
        let config = &info.config;
        assert!(config.max_bytes > 0, "{} has no byte limit", config.name);
        assert!(
            config.max_message_size > 0,
            "{} has no largest message",
            config.name
        );
        seen += 1;
    }
    assert!(
        seen >= 10,
        "3 streams, 6 buckets, the incoming store: {seen}"
    );
    let mut status = bus.status_stream.clone();
    let config = &status.info().await.expect("info").config;
    assert_eq!(config.max_bytes, quotas.status_stream_bytes);
    assert_eq!(config.max_message_size, quotas.status_message_bytes);
    assert!(config.max_age > Duration::ZERO);
    let fleet = bus.js.get_stream(format!("KV_{}", names::FLEET_BUCKET));
    let fleet = fleet.await.expect("fleet bucket");
    assert_eq!(
        fleet.cached_info().config.max_message_size,
        quotas.state_bytes
    );

    let subject = names::agent_heartbeat_subject("h1", "default");
    let over = bus
        .js
        .publish(
            subject.clone(),
            vec![b'x'; quotas.status_message_bytes as usize + 1].into(),
        )
        .await
        .expect("sent")
        .await;
    assert!(over.is_err(), "the status stream took an oversized report");
    let under = bus
        .js
        .publish(subject.clone(), vec![b'x'; 1024].into())
        .await
        .expect("sent")
        .await;
    assert!(under.is_ok(), "{under:?}");
    assert_eq!(status.info().await.expect("info").state.messages, 1);

    let too_big = bus
        .fleet
        .put("h1", vec![b'x'; quotas.state_bytes as usize + 1].into())
        .await;
    assert!(too_big.is_err(), "the fleet bucket took an oversized value");
}

/// An archive in the incoming store larger than the limits allow is refused from its stored
/// size, before a byte of it is written to the service's disk; a release rejected so is final
/// (no retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_over_the_limit_is_refused_before_anything_is_written() {
    let p = Pipeline::new().await.expect("pipeline");
    let bus = p.bus().await.expect("bus");
    let data = vec![7u8; 3 << 20];
    let blake3 = blake3::hash(&data).to_hex().to_string();
    bus.incoming
        .upload_archive("big.zip", &mut data.as_slice())
        .await
        .expect("upload");
    let work = tempfile::tempdir().expect("tmp");
    let dir = work.path().join("work");
    let refused = bus
        .incoming
        .fetch_archive("big.zip", &blake3, None, 1 << 20, &dir)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(refused, FetchError::TooLarge { size, limit, .. } if size == 3 << 20 && limit == 1 << 20),
        "{refused}"
    );
    assert!(refused.rejection().is_some(), "final, not retried");
    assert!(!dir.exists(), "nothing was written");
    // Within the limit it is fetched whole.
    let fetched = bus
        .incoming
        .fetch_archive("big.zip", &blake3, Some(3 << 20), 4 << 20, &dir)
        .await
        .expect("fetched");
    assert_eq!(fetched.size, 3 << 20);
}

/// End to end through the watcher: CI uploads an archive larger than the watcher's limits can
/// accept; the watcher refuses it from the object's stored size (not after unpacking it) and
/// publishes the rejection, once: it is not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_refuses_an_upload_over_its_limits_from_its_stored_size() {
    use fleetcast_events::v1::{PackageRejected, RejectCode};
    use fleetcast_harness::fixtures::{PackageBuilder, pseudo_random};

    let mut p = Pipeline::new().await.expect("pipeline");
    let mut watcher = p.watcher_settings();
    watcher.limits = fleetcast_package::ArchiveLimits {
        max_entries: 10,
        max_total_bytes: 1 << 20,
        ..Default::default()
    };
    assert!(watcher.limits.max_archive_bytes() < 2 << 20);
    p.start_watcher_with(watcher);
    let dir = tempfile::tempdir().expect("tmp");
    let zip = dir.path().join("big-1.0.0.zip");
    PackageBuilder::new()
        .file("data.bin", pseudo_random(2 << 20, 5), 0o644)
        .write_to(&zip)
        .expect("zip");
    let cli = p.cli().await.expect("bus");
    publish(&cli, &zip, Some("ci"))
        .await
        .expect("uploaded and announced");
    let rejected: PackageRejected = p
        .wait_event(names::PACKAGE_REJECTED, |_: &PackageRejected| true)
        .await
        .expect("rejected");
    assert_eq!(rejected.reason.code, RejectCode::TooLarge);
    assert!(
        rejected.reason.message.contains("an archive may have"),
        "refused from its stored size, before download: {}",
        rejected.reason.message
    );
    // Rejected once, acked: no redelivery after the watcher's ack wait rejects it again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        p.count_events(names::PACKAGE_REJECTED)
            .await
            .expect("count"),
        1
    );
}
