//! Identity from the transport, with the real per-agent credentials of `ops/nats/gen-accounts`:
//! an agent publishes only on subjects carrying its own id, ring and apps (the server refuses
//! the rest), and the tracker takes who sent a report or a slot request from its subject,
//! refuses a body that says otherwise, and answers only to the requester's inbox, from a
//! connection that may write nothing else. Each refusal is asserted from the tracker's state
//! (its answers over NATS, its `/metrics`) and the stores: no effect on any rollout.
//!
//! And a `rolled_back` status that never reaches the tracker still halts the rollout, through
//! the outcome every heartbeat repeats.
//!
//! The server runs from the shipped `ops/nats/secure.conf` with the accounts and TLS that
//! `ops/nats/gen-accounts --tls` issues (`Pipeline::new_closed`): what is tested is what ships.

use fleetcast_events::{AgentId, AppName, RingName};
use std::time::Duration;

use fleetcast_e2e::checks::{
    auto_approved, closed_pipeline, own_agent_runs_first_release, poll, status_of,
};
use fleetcast_e2e::{
    Pipeline, TIMEOUT, TestBus, Violations, free_addr, http_get, ring, running, script_app,
};
use fleetcast_events::names;
use fleetcast_events::tracker::Phase;
use fleetcast_events::tracker::{Command, Reply, RolloutSummary};
use fleetcast_events::v1::{
    AgentHeartbeat, AgentStatus, AppHeartbeat, AppState, SlotReply, SlotRequest,
};
use fleetcast_harness::accounts::{AgentSpec, agent_inbox_prefix};
use fleetcast_tracker::policy::{Amount, AppPolicy, RingPolicy};
use futures::StreamExt;
use time::OffsetDateTime;

fn v(s: &str) -> semver::Version {
    semver::Version::parse(s).expect("version")
}

fn heartbeat(agent_id: &str, ring: &str, running: Option<&str>) -> AgentHeartbeat {
    AgentHeartbeat {
        agent_id: AgentId::try_from(agent_id).expect("name"),
        host: agent_id.into(),
        ring: RingName::try_from(ring).expect("name"),
        labels: Default::default(),
        apps: vec![AppHeartbeat {
            app: AppName::from_static("shapp"),
            state: AppState::Running,
            running: running.map(v),
            staged: None,
            previous: None,
            uptime_s: 1,
            last_update: None,
        }],
        agent_version: None,
        metadata: None,
        at: OffsetDateTime::now_utc(),
    }
}

fn status(agent_id: &str, app: &str, state: AppState, version: &str) -> AgentStatus {
    AgentStatus {
        agent_id: AgentId::try_from(agent_id).expect("name"),
        app: AppName::try_from(app).expect("name"),
        state,
        version: Some(v(version)),
        progress_bytes: None,
        reason: Some("forged".into()),
        at: OffsetDateTime::now_utc(),
    }
}

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("encode")
}

/// Publishes to the status stream and waits for it to be stored (the server took it).
async fn stored(client: &async_nats::Client, subject: String, payload: Vec<u8>) {
    async_nats::jetstream::new(client.clone())
        .publish(subject.clone(), payload.into())
        .await
        .expect("publish")
        .await
        .unwrap_or_else(|e| panic!("{subject} not stored: {e}"));
}

/// One ring, `default`, one slot at a time, halted by the first failure.
fn one_ring() -> AppPolicy {
    auto_approved(vec![ring("default", 1, 1)])
}

/// The tracker under its own identity (replies as `tracker-reply`), serving HTTP on `listen`.
fn start_tracker(p: &mut Pipeline, listen: std::net::SocketAddr, policy: AppPolicy) {
    let mut settings = p.tracker_settings();
    settings.listen = listen;
    // The test's agents report when it says: they must not turn stale meanwhile.
    settings.stale_after = Duration::from_secs(600);
    settings.apps.insert(AppName::from_static("shapp"), policy);
    p.start_tracker_as_role(settings);
}

/// The tracker's view, asked as an operator.
async fn tracker_status(p: &Pipeline) -> Reply {
    try_tracker_status(p).await.expect("the tracker answers")
}

async fn try_tracker_status(p: &Pipeline) -> anyhow::Result<Reply> {
    let operator = p.bus_as("operator").await?;
    fleetcast_cli::tracker(&operator, &Command::Status).await
}

fn rollout_of<'a>(reply: &'a Reply, app: &str) -> Option<&'a RolloutSummary> {
    reply.rollouts.iter().find(|r| r.app == app)
}

/// Waits until the tracker's view satisfies `check`; returns that view.
async fn until_tracker(p: &Pipeline, what: &str, check: impl Fn(&Reply) -> bool) -> Reply {
    poll(Duration::from_millis(100), async || {
        // Not answered yet: the tracker is starting.
        match try_tracker_status(p).await {
            Ok(reply) if check(&reply) => Ok(reply),
            reply => Err(format!("timed out waiting for: {what}; tracker: {reply:?}")),
        }
    })
    .await
}

/// The desired state of `shapp` in ring `default`, as stored (with its revision).
async fn desired_entry(admin: &TestBus) -> async_nats::jetstream::kv::Entry {
    admin
        .desired
        .entry("shapp.default")
        .await
        .expect("read")
        .expect("the rollout's desired state")
}

/// `fleetcast_tracker_refused_total{what, reason}` from the tracker's `/metrics`.
fn refused(port: u16, what: &str, reason: &str) -> u64 {
    let labels = format!("{{what=\"{what}\",reason=\"{reason}\"}}");
    http_get(port, "/metrics")
        .lines()
        .find_map(|line| {
            line.strip_prefix("fleetcast_tracker_refused_total")?
                .strip_prefix(&labels)?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0, |n| n as u64)
}

/// Waits until the tracker counted at least `n` refusals of `what` for `reason`.
async fn until_refused(port: u16, what: &str, reason: &str, n: u64) {
    fleetcast_e2e::eventually(&format!("{n} {what} refused for {reason}"), || {
        refused(port, what, reason) >= n
    })
    .await;
}

/// A fleet of two agents in ring `default` (h1 and h2) and one in `canary` (c1), with a
/// release of `shapp` rolling out: h1 reported (running nothing yet), so the ring waits for it.
async fn rolling_out() -> (Pipeline, u16, async_nats::Client, Violations) {
    let mut p = closed_pipeline(&[
        AgentSpec::new("h1", "default", &["shapp"]),
        AgentSpec::new("h2", "default", &["shapp"]),
        AgentSpec::new("c1", "canary", &["shapp"]),
    ])
    .await;
    let listen = free_addr();
    start_tracker(&mut p, listen, one_ring());
    until_tracker(&p, "the tracker up", |_| true).await;
    let (h1, refused_h1) = p.agent_client("h1").await;
    stored(
        &h1,
        names::agent_heartbeat_subject("h1", "default"),
        json(&heartbeat("h1", "default", None)),
    )
    .await;
    until_tracker(&p, "h1 known", |r| {
        r.agents.iter().any(|a| a.agent_id == "h1")
    })
    .await;
    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    until_tracker(&p, "the rollout of 1.0.0", |r| {
        rollout_of(r, "shapp").is_some_and(|r| r.version == v("1.0.0") && r.phase == Phase::Running)
    })
    .await;
    (p, listen.port(), h1, refused_h1)
}

/// With h1's credentials: reports as h2, in another ring, about another app are refused by the
/// server; reports on h1's own subjects whose body claims to be h2, another ring or another
/// app are refused by the tracker (counted). Nothing reaches the rollout: no failure, no
/// host done, no h2 in the inventory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agents_credentials_cannot_report_as_another_agent_ring_or_app() {
    let (p, port, h1, refused_by_server) = rolling_out().await;

    // The server: another agent's subjects, h1 in another ring, h1 about an app not its own.
    let forged_status = json(&status("h2", "shapp", AppState::RolledBack, "1.0.0"));
    let forged_running = json(&heartbeat("h2", "default", Some("1.0.0")));
    for (subject, payload) in [
        (
            names::agent_status_subject("h2", "default", "shapp"),
            &forged_status,
        ),
        (
            names::agent_heartbeat_subject("h2", "default"),
            &forged_running,
        ),
        (
            names::agent_status_subject("h1", "canary", "shapp"),
            &json(&status("h1", "shapp", AppState::RolledBack, "1.0.0")),
        ),
        (
            names::agent_heartbeat_subject("h1", "canary"),
            &json(&heartbeat("h1", "canary", Some("1.0.0"))),
        ),
        (
            names::agent_status_subject("h1", "default", "otherapp"),
            &json(&status("h1", "otherapp", AppState::RolledBack, "1.0.0")),
        ),
    ] {
        h1.publish(subject.clone(), payload.clone().into())
            .await
            .expect("sent");
        refused_by_server.publish_refused(&subject).await;
    }
    let admin = p.bus().await.expect("admin");
    for subject in [
        "fleetcast.v1.agent.h2.>",
        "fleetcast.v1.agent.h1.canary.>",
        "fleetcast.v1.agent.h1.default.status.otherapp",
    ] {
        assert!(
            admin
                .status_stream
                .get_last_raw_message_by_subject(subject)
                .await
                .is_err(),
            "a report stored on {subject}"
        );
    }

    // The tracker: h1's own subjects, bodies that say otherwise.
    let own_heartbeat = names::agent_heartbeat_subject("h1", "default");
    let own_status = names::agent_status_subject("h1", "default", "shapp");
    stored(&h1, own_heartbeat.clone(), forged_running.clone()).await;
    stored(
        &h1,
        own_heartbeat.clone(),
        json(&heartbeat("h1", "canary", Some("1.0.0"))),
    )
    .await;
    stored(&h1, own_status.clone(), forged_status.clone()).await;
    stored(
        &h1,
        own_status.clone(),
        json(&status("h1", "otherapp", AppState::RolledBack, "1.0.0")),
    )
    .await;
    until_refused(port, "heartbeat", "identity", 2).await;
    until_refused(port, "status", "identity", 2).await;

    let reply = tracker_status(&p).await;
    let ids: Vec<&str> = reply.agents.iter().map(|a| a.agent_id.as_str()).collect();
    assert_eq!(ids, ["h1"], "no other agent in the inventory: {reply:?}");
    let h1_view = &reply.agents[0];
    assert_eq!(h1_view.ring, "default");
    assert_eq!(
        h1_view.apps.get("shapp").and_then(|a| a.running.clone()),
        None,
        "h1 still runs nothing as far as the tracker knows"
    );
    assert!(!h1_view.apps.contains_key("otherapp"));
    let rollout = rollout_of(&reply, "shapp").expect("rollout");
    assert_eq!(rollout.phase, Phase::Running, "{rollout:?}");
    assert!(rollout.failures.is_empty(), "{rollout:?}");
    assert_eq!(
        rollout.rings[0].done, 0,
        "no host counted done: {rollout:?}"
    );
    assert_eq!(rollout.rings[0].targets, 1, "{rollout:?}");
}

/// Slot requests: h1 cannot ask on h2's subject or for an app not its own (the server), nor
/// with a body naming h2 or another ring on its own (the tracker); a request naming a KV key
/// (`$KV.fleetcast-desired.shapp.default`, which once overwrote a ring's desired state) or
/// h2's inbox as reply subject is not answered, nor acted on; an operator's command naming a
/// KV key is not answered either; the tracker's reply identity cannot write the store. And
/// h1's own request, to its own inbox, is granted in the ring its reports put it in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_requests_are_their_subjects_agent_and_replies_go_to_its_inbox_only() {
    let (p, port, h1, refused_by_server) = rolling_out().await;
    let request = |agent_id: &str, app: &str, ring: &str| SlotRequest {
        agent_id: AgentId::try_from(agent_id).expect("name"),
        app: AppName::try_from(app).expect("name"),
        ring: RingName::try_from(ring).expect("name"),
        version: v("1.0.0"),
    };

    // The server: another agent's slot subject, an app not h1's.
    for subject in [
        names::slot_subject("shapp", "h2"),
        names::slot_subject("otherapp", "h1"),
    ] {
        h1.publish(
            subject.clone(),
            json(&request("h2", "shapp", "default")).into(),
        )
        .await
        .expect("sent");
        refused_by_server.publish_refused(&subject).await;
    }

    // The tracker: h1's subject, a body naming another agent or ring.
    let own = names::slot_subject("shapp", "h1");
    for (body, why) in [
        (request("h2", "shapp", "default"), "h2"),
        (request("h1", "shapp", "canary"), "canary"),
    ] {
        let answer = h1
            .request(own.clone(), json(&body).into())
            .await
            .expect("answered");
        let reply: SlotReply = serde_json::from_slice(&answer.payload).expect("reply");
        assert!(!reply.granted, "{reply:?}");
        assert!(
            reply.reason.as_deref().is_some_and(|r| r.contains(why)),
            "{reply:?}"
        );
    }
    assert_eq!(refused(port, "slot", "identity"), 2);

    // Reply subjects that are not h1's inbox: a KV key of the desired state, h2's inbox.
    let admin = p.bus().await.expect("admin");
    let desired_before = desired_entry(&admin).await;
    let kv_reply = format!("$KV.{}.shapp.default", names::DESIRED_BUCKET);
    for reply_to in [
        kv_reply.clone(),
        format!("{}.stolen", agent_inbox_prefix("h2")),
    ] {
        h1.publish_with_reply(
            own.clone(),
            reply_to,
            json(&request("h1", "shapp", "default")).into(),
        )
        .await
        .expect("sent");
    }
    until_refused(port, "slot", "reply_to", 2).await;
    // An operator's question, answered to a KV key: not answered either.
    let (operator, _) = p
        .client_as(
            &p.accounts.as_ref().expect("accounts").creds("operator"),
            None,
        )
        .await;
    operator
        .publish_with_reply(
            names::TRACKER_QUERY,
            kv_reply.clone(),
            serde_json::to_vec(&Command::Status).expect("encode").into(),
        )
        .await
        .expect("sent");
    until_refused(port, "command", "reply_to", 1).await;
    // The tracker's reply identity may write inboxes, nothing else.
    let (replier, refused_reply) = p
        .client_as(
            &p.accounts
                .as_ref()
                .expect("accounts")
                .creds("tracker-reply"),
            None,
        )
        .await;
    replier
        .publish(kv_reply.clone(), "{\"app\":\"evil\"}".into())
        .await
        .expect("sent");
    refused_reply.publish_refused(&kv_reply).await;

    let desired_after = desired_entry(&admin).await;
    assert_eq!(
        (desired_after.revision, desired_after.value),
        (desired_before.revision, desired_before.value),
        "the desired state was not written"
    );
    let reply = tracker_status(&p).await;
    let rollout = rollout_of(&reply, "shapp").expect("rollout");
    assert!(
        rollout.slots.is_empty(),
        "no slot taken by a refused request: {rollout:?}"
    );

    // h1's own request, to its own inbox: granted, in its reported ring.
    let answer = h1
        .request(own.clone(), json(&request("h1", "shapp", "default")).into())
        .await
        .expect("answered");
    let reply: SlotReply = serde_json::from_slice(&answer.payload).expect("reply");
    assert!(reply.granted, "{reply:?}");
    let reply = tracker_status(&p).await;
    let rollout = rollout_of(&reply, "shapp").expect("rollout");
    assert_eq!(
        rollout.slots.get("h1").map(|l| l.ring.as_str()),
        Some("default"),
        "{rollout:?}"
    );
    assert_eq!(rollout.slots.len(), 1, "{rollout:?}");
}

/// A real agent rolls a bad version back, and its `rolled_back` status is lost: it never
/// reaches the tracker (here: removed from the status stream while the tracker was down). The
/// heartbeats the agent goes on sending say how the update ended, and the rollout halts on
/// them, with the agent's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_rolled_back_status_still_halts_the_rollout_through_the_heartbeats() {
    let mut p = closed_pipeline(&[AgentSpec::new("h1", "default", &["shapp"])]).await;
    let policy = AppPolicy {
        // Every host at once: no slot to ask for while the tracker is down.
        rings: vec![RingPolicy {
            parallel: Amount::Percent(100),
            ..one_ring().rings.remove(0)
        }],
        ..one_ring()
    };
    start_tracker(&mut p, free_addr(), policy.clone());
    let (_host, state) = own_agent_runs_first_release(&mut p, "h1", "default").await;
    until_tracker(&p, "1.0.0 rolled out", |r| {
        rollout_of(r, "shapp").is_some_and(|r| r.phase == Phase::Completed)
    })
    .await;

    // The tracker goes down; 1.1.0 (which crashes at once) reaches h1 meanwhile.
    p.stop("tracker").await;
    p.release("shapp", "1.1.0", &script_app("1.1.0", false))
        .await;
    p.desire("shapp", "default", "1.1.0").await;
    status_of(&p, AppState::RolledBack, "1.1.0").await;
    // (The app writes the file again as it restarts: read until it has.)
    fleetcast_e2e::eventually("h1 runs 1.0.0 again", || running(&state) == "1.0.0").await;

    // Its status is lost.
    let admin = p.bus().await.expect("admin");
    let subject = names::agent_status_subject("h1", "default", "shapp");
    let rolled_back = |admin: fleetcast_e2e::TestBus, subject: String| async move {
        let consumer = admin
            .status_stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: subject.clone(),
                ..Default::default()
            })
            .await
            .expect("consumer");
        let pending = consumer.cached_info().num_pending;
        let mut messages = consumer.messages().await.expect("messages");
        let mut found = Vec::new();
        for _ in 0..pending {
            let msg = tokio::time::timeout(TIMEOUT, messages.next())
                .await
                .expect("a message")
                .expect("stream")
                .expect("message");
            let st: AgentStatus = fleetcast_runtime::consume::decode(&msg).expect("a status");
            if st.state == AppState::RolledBack {
                found.push(msg.info().expect("info").stream_sequence);
            }
        }
        found
    };
    let lost = rolled_back(admin.clone(), subject.clone()).await;
    assert!(!lost.is_empty());
    for seq in lost {
        assert!(
            admin
                .status_stream
                .delete_message(seq)
                .await
                .expect("delete")
        );
    }
    assert!(
        rolled_back(admin.clone(), subject.clone()).await.is_empty(),
        "no rolled_back status left for the tracker to read"
    );

    // The tracker comes back: it rolls 1.1.0 out, and halts on what the heartbeats say.
    start_tracker(&mut p, free_addr(), policy);
    let reply = until_tracker(&p, "the rollout of 1.1.0 halted", |r| {
        rollout_of(r, "shapp").is_some_and(|r| r.version == v("1.1.0") && r.phase == Phase::Halted)
    })
    .await;
    let rollout = rollout_of(&reply, "shapp").expect("rollout");
    // The agent's own reason, which only its heartbeats carried.
    let why = rollout.failures.get("h1").cloned().unwrap_or_default();
    assert!(!why.is_empty() && why != "no reason given", "{rollout:?}");
    assert!(
        rollout
            .reason
            .as_deref()
            .is_some_and(|r| r.contains(&format!("h1: {why}"))),
        "{rollout:?}"
    );
    let h1 = reply
        .agents
        .iter()
        .find(|a| a.agent_id == "h1")
        .expect("h1");
    let error = h1.apps["shapp"].last_error.clone().expect("last error");
    assert_eq!(
        (error.state, error.version),
        (AppState::RolledBack, Some(v("1.1.0")))
    );
}
