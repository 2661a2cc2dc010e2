//! NATS least privilege: a nats-server with the accounts and per-role permissions that
//! `ops/nats/gen-accounts` issues. The whole path works with every program under its own
//! identity (CI, the pipeline's services, the tracker, operators, one identity per agent), and
//! each forbidden action is refused. NATS refuses a publish or a subscription by dropping it
//! and telling the client asynchronously (`-ERR 'Permissions Violation …'`, a connection event
//! in async-nats, never an error from `publish`): each test waits for that event, and checks
//! with the admin identity that nothing changed.
//!
//! The server runs from the shipped `ops/nats/secure.conf` with the accounts and TLS that
//! `ops/nats/gen-accounts --tls` issues (`Pipeline::new_closed`): what is tested is what ships.

use fleetcast_e2e::checks::{
    api_refuses, assert_chunks_kept, assert_no_permission_violations, ci_publishes, closed_pipeline,
};
use fleetcast_e2e::{Pipeline, TIMEOUT, eventually, running, script_app};
use fleetcast_events::AppName;
use fleetcast_events::names;
use fleetcast_harness::accounts::{AgentSpec, agent_inbox_prefix};
use fleetcast_harness::fixtures::{pseudo_random, rebuilt};
use std::time::Duration;

/// The trust bucket (roots and the signer's timestamp; `names::TRUST_BUCKET`).
const TRUST_BUCKET: &str = "fleetcast-trust";

fn fleet() -> Vec<AgentSpec> {
    vec![
        AgentSpec::new("h1", "default", &["shapp"]),
        AgentSpec::new("h2", "default", &["shapp"]),
    ]
}

/// The allowed path, end to end: CI publishes (upload + announcement) and waits for the
/// record, the watcher, signer and distributor store the release, the tracker rolls it out,
/// two agents each with their own identity download, verify and run it, and report; CI
/// follows the rollout; the next release comes through the drop folder. Not one permission
/// violation in the server's log: every role has what it uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_reaches_every_agent_with_each_program_under_its_own_identity() {
    let mut p = closed_pipeline(&fleet()).await;
    p.start_tracker_as_role(p.tracker_settings());
    let hosts = tempfile::tempdir().expect("tmp");
    for id in ["h1", "h2"] {
        let settings = p.agent_settings(id, "default", &hosts.path().join(id));
        p.start_agent_as_itself(settings);
    }

    // CI: `fleetcast publish --wait` with the ci identity.
    let ci = p.bus_as("ci").await.expect("ci connects");
    let zip = hosts.path().join("shapp-1.0.0.zip");
    // With a native library rebuilt between the versions: 1.1.0 gets a binary patch from it.
    let engine = pseudo_random(300_000, 5);
    script_app("1.0.0", true)
        .file("lib/engine.so", engine.clone(), 0o644)
        .write_to(&zip)
        .expect("zip");
    let v1 = ci_publishes(&ci, &zip, "shapp", "1.0.0").await.version;
    for id in ["h1", "h2"] {
        let state = hosts.path().join(id).join("state");
        eventually(&format!("{id} runs 1.0.0"), || running(&state) == "1.0.0").await;
    }
    // CI follows the rollout (`fleetcast rollout watch`), an operator asks the tracker.
    let view = tokio::time::timeout(
        TIMEOUT,
        fleetcast_cli::watch_rollout(&ci, &AppName::from_static("shapp"), Some(&v1)),
    )
    .await
    .expect("rollout ends")
    .expect("ci watches the rollout");
    assert!(!view.phase.is_active(), "{view:?}");
    let operator = p.bus_as("operator").await.expect("operator connects");
    let reply = fleetcast_cli::tracker(
        &operator,
        &fleetcast_events::tracker::Command::Show {
            app: AppName::from_static("shapp"),
        },
    )
    .await
    .expect("operator asks the tracker");
    assert!(reply.ok, "{reply:?}");
    let releases = fleetcast_cli::releases(&operator, Some("shapp"))
        .await
        .expect("operator lists releases");
    assert_eq!(releases.len(), 1);

    // The drop-folder path (the watcher uploads), and an update of both agents.
    let engine2 = rebuilt(&engine, 2);
    p.release(
        "shapp",
        "1.1.0",
        &script_app("1.1.0", true).file("lib/engine.so", engine2.clone(), 0o644),
    )
    .await;
    for id in ["h1", "h2"] {
        let state = hosts.path().join(id).join("state");
        eventually(&format!("{id} runs 1.1.0"), || running(&state) == "1.1.0").await;
    }
    // The tracker, seeing its fleet on 1.0.0, asked for patches; the distributor made one.
    let admin = p.bus().await.expect("admin");
    let m2 = admin
        .records
        .release_record("shapp", &semver::Version::new(1, 1, 0))
        .await
        .expect("record")
        .and_then(|r| r.manifest)
        .expect("manifest")
        .verify(&p.trusted(), time::OffsetDateTime::now_utc())
        .expect("verifies");
    let list_subject =
        names::chunk_subject("shapp", &fleetcast_events::patches::list_key(&m2.tree.root));
    let mut list = None;
    for _ in 0..300 {
        if let Ok(m) = admin
            .chunks
            .direct_get_last_for_subject(list_subject.clone())
            .await
        {
            list = Some(fleetcast_events::patches::PatchList::decode(&m.payload).expect("list"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let list = list.expect("a patch list for 1.1.0");
    assert_eq!(list.patches.len(), 1, "{list:?}");
    assert_eq!(
        list.patches[0].file.to_hex(),
        blake3::hash(&engine2).to_hex().as_str()
    );
    // Each agent reported under its own subject.
    for id in ["h1", "h2"] {
        let subject = names::agent_status_subject(id, "default", "shapp");
        assert!(
            p.bus()
                .await
                .expect("admin")
                .status_stream
                .get_last_raw_message_by_subject(&subject)
                .await
                .is_ok(),
            "no status from {id}"
        );
    }
    assert_no_permission_violations(&p.nats);
}

/// An agent's credentials let it do nothing but read what it needs and report about itself:
/// no desired state written, no other agent's status, no release event, no other agent's
/// replies, no other app's or ring's desired state, no stream deleted or purged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_identity_is_refused_everything_but_its_own_business() {
    let p = closed_pipeline(&fleet()).await;
    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    p.desire("shapp", "default", "1.0.0").await;
    let admin = p.bus().await.expect("admin");
    let desired_before = admin
        .desired
        .get("shapp.default")
        .await
        .expect("get")
        .expect("desired state");

    let accounts = p.accounts.as_ref().expect("accounts");
    let (h1, refused) = p
        .client_as(&accounts.agent_creds("h1"), Some(agent_inbox_prefix("h1")))
        .await;
    let js = async_nats::jetstream::new(h1.clone());

    // What it may do: read its own desired state (by direct get, as the agent does: no stream
    // info, see agent_scope.rs), report its own status.
    let desired = fleetcast_runtime::agent_bus::DirectKv::new(&js, names::DESIRED_BUCKET)
        .await
        .expect("desired");
    assert_eq!(
        desired.get("shapp.default").await.expect("own desired"),
        Some(desired_before.clone())
    );
    js.publish(
        names::agent_status_subject("h1", "default", "shapp"),
        "{}".into(),
    )
    .await
    .expect("publish")
    .await
    .expect("own status stored");
    // And the agent's own releases, which every agent may take (gen-accounts adds them).
    let own_agent = names::agent_app(std::env::consts::OS, std::env::consts::ARCH);
    assert_eq!(
        desired
            .get(&format!("{own_agent}.default"))
            .await
            .expect("the agent release's desired state may be read"),
        None
    );
    js.publish(
        names::agent_status_subject("h1", "default", &own_agent),
        "{}".into(),
    )
    .await
    .expect("publish")
    .await
    .expect("status of the agent's own release stored");

    // Write desired state: its own key, another ring's.
    for key in ["shapp.default", "shapp.canary"] {
        let subject = format!("$KV.{}.{key}", names::DESIRED_BUCKET);
        h1.publish(subject.clone(), "{\"app\":\"evil\"}".into())
            .await
            .expect("sent");
        refused.publish_refused(&subject).await;
    }
    assert_eq!(
        admin.desired.get("shapp.default").await.expect("get"),
        Some(desired_before),
        "desired state unchanged"
    );
    assert_eq!(
        admin.desired.get("shapp.canary").await.expect("get"),
        None,
        "no desired state written for another ring"
    );

    // Another agent's status and heartbeat; release events; another app's slots.
    let releases_before = p.count_events("fleetcast.v1.>").await.expect("count");
    for subject in [
        names::agent_status_subject("h2", "default", "shapp"),
        names::agent_heartbeat_subject("h2", "default"),
        // Its own id in another ring, about another app.
        names::agent_heartbeat_subject("h1", "canary"),
        names::agent_status_subject("h1", "default", "otherapp"),
        names::release_published_subject("h1"),
        names::RELEASE_SIGNED.to_string(),
        names::RELEASE_STORED.to_string(),
        names::ROLLBACK_SIGNED.to_string(),
        names::slot_subject("otherapp", "h1"),
        names::slot_subject("shapp", "h2"),
        names::tracker_command_subject("h1"),
        names::TRACKER_QUERY.to_string(),
        // Upload an archive to the incoming store (its chunks and its metadata).
        format!("$O.{}.C.forged", names::INCOMING_BUCKET),
        format!("$O.{}.M.forged", names::INCOMING_BUCKET),
        // Only the server republishes writes of the desired state and the trust.
        names::desired_subject("shapp", "default"),
        format!("{}{}", names::TRUST_SUBJECT_PREFIX, names::TIMESTAMP_KEY),
    ] {
        h1.publish(subject.clone(), "{}".into())
            .await
            .expect("sent");
        refused.publish_refused(&subject).await;
    }
    assert!(
        admin
            .status_stream
            .get_last_raw_message_by_subject("fleetcast.v1.agent.h2.>")
            .await
            .is_err(),
        "no report stored as h2"
    );
    assert_eq!(
        p.count_events("fleetcast.v1.>").await.expect("count"),
        releases_before,
        "no release event stored"
    );

    // Another agent's replies, another app's or ring's desired state, by subscription or by
    // direct get.
    for subject in [
        format!("{}.>", agent_inbox_prefix("h2")),
        "_INBOX.>".to_string(),
        format!("$KV.{}.otherapp.default", names::DESIRED_BUCKET),
        format!("$KV.{}.shapp.canary", names::DESIRED_BUCKET),
        format!("$KV.{}.>", names::DESIRED_BUCKET),
        names::desired_subject("otherapp", "default"),
        names::desired_subject("shapp", "canary"),
        format!("{}>", names::DESIRED_SUBJECT_PREFIX),
        // Another agent's remedies from the tracker.
        names::remedy_subject("h2"),
    ] {
        let _sub = h1.subscribe(subject.clone()).await.expect("sent");
        refused.subscription_refused(&subject).await;
    }
    // Nor may it send one, to itself or another agent: only the tracker may.
    for subject in [names::remedy_subject("h1"), names::remedy_subject("h2")] {
        h1.publish(subject.clone(), "{}".into())
            .await
            .expect("sent");
        refused.publish_refused(&subject).await;
    }
    let other_app = format!(
        "$JS.API.DIRECT.GET.KV_{0}.$KV.{0}.otherapp.default",
        names::DESIRED_BUCKET
    );
    h1.publish(other_app.clone(), "".into())
        .await
        .expect("sent");
    refused.publish_refused(&other_app).await;

    // Delete or purge a stream, delete a consumer, write the trust bucket.
    for subject in [
        format!("$JS.API.STREAM.DELETE.{}", names::CHUNKS_STREAM),
        format!("$JS.API.STREAM.PURGE.KV_{}", names::DESIRED_BUCKET),
        format!("$JS.API.STREAM.UPDATE.{}", names::STATUS_STREAM),
        format!("$JS.API.CONSUMER.DELETE.{}.tracker", names::RELEASES_STREAM),
        format!("$KV.{}.timestamp", TRUST_BUCKET),
        format!("$KV.{}.root.2", TRUST_BUCKET),
    ] {
        h1.publish(subject.clone(), "{}".into())
            .await
            .expect("sent");
        refused.publish_refused(&subject).await;
    }
    assert!(
        api_refuses(js.delete_stream(names::CHUNKS_STREAM)).await,
        "deleting a stream through the API fails"
    );
    assert_chunks_kept(&admin).await;
    // The server logs what it refused (what the allowed-path test finds none of).
    let log = p.nats.log();
    assert!(log.contains("Publish Violation") && log.contains("Subscription Violation"));
}

/// An agent that does not use its own inbox prefix cannot even make a request: the shared
/// `_INBOX` is not its to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_its_inbox_prefix_gets_no_replies() {
    let p = closed_pipeline(&fleet()).await;
    let accounts = p.accounts.as_ref().expect("accounts");
    let (h1, refused) = p.client_as(&accounts.agent_creds("h1"), None).await;
    let js = async_nats::jetstream::new(h1.clone());
    let desired = fleetcast_runtime::agent_bus::DirectKv::new(&js, names::DESIRED_BUCKET)
        .await
        .expect("desired");
    assert!(
        desired.get("shapp.default").await.is_err(),
        "a request without the agent's inbox gets no answer"
    );
    eventually("the shared inbox refused", || {
        refused.any(|e| e.contains("Permissions Violation for Subscription to \"_INBOX."))
    })
    .await;
}

/// Every other role is held to its own job: CI cannot sign, store, desire or delete; the
/// watcher and distributor cannot sign; the signer cannot store or desire or replace the root
/// of trust; the tracker cannot sign or store chunks; operators cannot delete streams or
/// forge the signer's timestamp. And a client without credentials is turned away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_is_refused_what_is_not_its_job() {
    let p = closed_pipeline(&fleet()).await;
    let delete_chunks = format!("$JS.API.STREAM.DELETE.{}", names::CHUNKS_STREAM);
    let desired = format!("$KV.{}.shapp.default", names::DESIRED_BUCKET);
    let table: [(&str, Vec<String>); 6] = [
        (
            "ci",
            vec![
                names::RELEASE_SIGNED.into(),
                names::RELEASE_STORED.into(),
                names::agent_status_subject("h1", "default", "shapp"),
                desired.clone(),
                format!("$KV.{}.shapp.1.0.0", names::RELEASES_BUCKET),
                names::chunk_subject("shapp", "00"),
                delete_chunks.clone(),
                // It may ask the tracker (rollout watch), not steer it.
                names::tracker_command_subject("ci"),
                // Nor announce a release as somebody else (the history would name them).
                names::release_published_subject("operator"),
            ],
        ),
        (
            "watcher",
            vec![
                names::RELEASE_SIGNED.into(),
                names::RELEASE_STORED.into(),
                desired.clone(),
                delete_chunks.clone(),
            ],
        ),
        (
            "signer",
            vec![
                names::RELEASE_STORED.into(),
                names::chunk_subject("shapp", "00"),
                desired.clone(),
                format!("$KV.{}.root.2", TRUST_BUCKET),
                delete_chunks.clone(),
            ],
        ),
        (
            "distributor",
            vec![
                names::RELEASE_SIGNED.into(),
                names::ROLLBACK_SIGNED.into(),
                format!("$KV.{}.shapp", names::SIGNER_BUCKET),
                desired.clone(),
                delete_chunks.clone(),
            ],
        ),
        (
            "tracker",
            vec![
                names::RELEASE_SIGNED.into(),
                names::ROLLBACK_SIGNED.into(),
                names::chunk_subject("shapp", "00"),
                format!("$KV.{}.shapp.1.0.0", names::RELEASES_BUCKET),
                delete_chunks.clone(),
                // Its own rollback subject only (rollbacks asked over HTTP).
                names::rollback_requested_subject("alice"),
            ],
        ),
        (
            "operator",
            vec![
                names::RELEASE_SIGNED.into(),
                names::RELEASE_STORED.into(),
                format!("$KV.{}.timestamp", TRUST_BUCKET),
                format!("$KV.{}.shapp.1.0.0", names::RELEASES_BUCKET),
                delete_chunks.clone(),
                format!("$JS.API.STREAM.PURGE.{}", names::RELEASES_STREAM),
                // Nobody steers, publishes or writes history under another's name.
                names::tracker_command_subject("alice"),
                names::release_published_subject("ci"),
                names::rollback_requested_subject("alice"),
                names::history_subject(Some("shapp"), "operator.action"),
            ],
        ),
    ];
    let accounts = p.accounts.as_ref().expect("accounts");
    for (role, subjects) in &table {
        let (client, refused) = p.client_as(&accounts.creds(role), None).await;
        for subject in subjects {
            client
                .publish(subject.clone(), "{}".into())
                .await
                .expect("sent");
            refused.publish_refused(subject).await;
        }
    }
    assert_eq!(
        p.count_events(names::RELEASE_SIGNED).await.expect("count"),
        0
    );
    assert!(
        p.bus()
            .await
            .expect("admin")
            .js
            .get_stream(names::CHUNKS_STREAM)
            .await
            .is_ok()
    );

    // No credentials, or an agent's credentials revoked: the connection is refused.
    let anonymous = tokio::time::timeout(TIMEOUT, async_nats::connect(p.nats.url())).await;
    assert!(
        !matches!(anonymous, Ok(Ok(ref c)) if c.flush().await.is_ok()),
        "a client without credentials is refused"
    );
}

/// An agent's identity revoked (a host decommissioned or compromised): once the servers load
/// the re-issued accounts, its credentials no longer connect; the other agent's still do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_turned_away() {
    let mut p = Pipeline::new_with_permissions(&fleet())
        .await
        .expect("pipeline");
    let accounts = p.accounts.as_ref().expect("accounts");
    let h2_creds = accounts.agent_creds("h2");
    let kept = std::fs::read_to_string(&h2_creds).expect("h2 creds");
    accounts.revoke("h2").expect("revoke");
    let conf = accounts.auth_conf().expect("auth.conf");
    p.nats.reload_with_config(&conf).await.expect("reload");
    let stale = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(stale.path(), kept).expect("write");
    let connect = |creds: std::path::PathBuf| {
        let url = p.nats.url();
        async move {
            let options = async_nats::ConnectOptions::new()
                .credentials_file(creds)
                .await
                .expect("creds");
            match tokio::time::timeout(TIMEOUT, options.connect(url)).await {
                Ok(Ok(client)) => client.flush().await.is_ok(),
                _ => false,
            }
        }
    };
    assert!(
        !connect(stale.path().to_path_buf()).await,
        "the revoked agent is refused"
    );
    let accounts = p.accounts.as_ref().expect("accounts");
    assert!(
        connect(accounts.agent_creds("h1")).await,
        "h1 still connects"
    );
}
