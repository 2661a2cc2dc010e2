//! The tracker with real agents: releases roll out ring by ring, with no more hosts switching
//! at once than the ring allows (checked from the agents' own status events), and a version
//! that fails crosses the threshold and halts before later rings receive it.

use fleetcast_events::{AppName, RingName};
use std::time::Duration;

use fleetcast_e2e::checks::{
    approve, auto_approved, poll, release_until, status_of, stream_messages, until,
};
use fleetcast_e2e::{Pipeline, TIMEOUT, eventually, fleet_in, ring, rollout_phase, script_app};
use fleetcast_events::tracker::Command;
use fleetcast_events::tracker::Phase;
use fleetcast_events::v1::{AgentStatus, AppState, DesiredState};
use fleetcast_tracker::policy::{AppPolicy, Approval, RingPolicy};
use futures::StreamExt;
use semver::Version;

fn v(s: &str) -> Version {
    Version::parse(s).expect("version")
}

/// A pipeline, a tracker with `policy` for `shapp`, and agents `(id, ring)`, all known to the
/// tracker before anything is released.
async fn fleet(policy: AppPolicy, agents: &[(&str, &str)]) -> (Pipeline, tempfile::TempDir) {
    let (p, hosts, _) = fleet_on(policy, agents).await;
    (p, hosts)
}

/// As [`fleet`]; also returns the tracker's HTTP port.
async fn fleet_on(
    policy: AppPolicy,
    agents: &[(&str, &str)],
) -> (Pipeline, tempfile::TempDir, u16) {
    let mut p = Pipeline::start().await.expect("pipeline");
    let settings = p.tracker_settings();
    let (hosts, port) = fleet_in(&mut p, settings, policy, agents).await;
    (p, hosts, port)
}

/// Every status event so far, in order.
async fn statuses(p: &Pipeline) -> Vec<AgentStatus> {
    let bus = p.bus().await.expect("bus");
    let mut out = Vec::new();
    let consumer = bus
        .status_stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: fleetcast_events::names::ALL_AGENT_STATUSES.into(),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let pending = stream_messages(&bus.status_stream).await;
    let mut messages = consumer.messages().await.expect("messages");
    while let Ok(Some(Ok(msg))) =
        tokio::time::timeout(Duration::from_millis(500), messages.next()).await
    {
        if let Ok(s) = fleetcast_runtime::consume::decode::<AgentStatus>(&msg) {
            out.push(s);
        }
        if msg.info().is_ok_and(|i| i.stream_sequence >= pending) {
            break;
        }
    }
    out
}

/// Per agent, the span from its `switching` to its result for `version`.
fn spans(
    all: &[AgentStatus],
    version: &Version,
) -> Vec<(
    fleetcast_events::AgentId,
    time::OffsetDateTime,
    time::OffsetDateTime,
)> {
    let mut out = Vec::new();
    for s in all
        .iter()
        .filter(|s| s.state == AppState::Switching && s.version.as_ref() == Some(version))
    {
        let end = all
            .iter()
            .find(|e| {
                e.agent_id == s.agent_id
                    && e.version.as_ref() == Some(version)
                    && matches!(e.state, AppState::Running | AppState::RolledBack)
                    && e.at >= s.at
            })
            .map(|e| e.at)
            .expect("every switch ends");
        out.push((s.agent_id.clone(), s.at, end));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rings_roll_out_in_order_with_no_more_hosts_switching_than_allowed() {
    let policy = auto_approved(vec![ring("canary", 1, 1), ring("broad", 1, 1)]);
    let agents = [
        ("c1", "canary"),
        ("b1", "broad"),
        ("b2", "broad"),
        ("b3", "broad"),
    ];
    let (p, _hosts) = fleet(policy, &agents).await;

    release_until(&p, "1.0.0", true, Phase::Completed).await;
    let done = release_until(&p, "2.0.0", true, Phase::Completed).await;
    assert_eq!(done.version, v("2.0.0"));
    for ring in &done.rings {
        assert_eq!(ring.done, ring.targets, "{ring:?}");
    }
    assert_eq!(done.rings.iter().map(|r| r.targets).sum::<usize>(), 4);

    let all = statuses(&p).await;
    for version in [v("1.0.0"), v("2.0.0")] {
        let spans = spans(&all, &version);
        assert_eq!(spans.len(), 4, "{version}: {spans:?}");
        let canary_end = spans
            .iter()
            .find(|s| s.0 == "c1")
            .map(|s| s.2)
            .expect("canary");
        for (agent, start, end) in &spans {
            if agent != "c1" {
                assert!(
                    *start >= canary_end,
                    "{version}: {agent} switched before the canary finished"
                );
            }
            // parallel = 1 in both rings: no two spans of a ring overlap.
            for (other, o_start, o_end) in &spans {
                let same_ring = (agent == "c1") == (other == "c1");
                if other != agent && same_ring {
                    assert!(
                        end <= o_start || o_end <= start,
                        "{version}: {agent} and {other} switched at the same time"
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_version_halts_the_rollout_before_later_rings_get_it() {
    let policy = auto_approved(vec![ring("canary", 2, 1), ring("broad", 2, 1)]);
    let agents = [("c1", "canary"), ("c2", "canary"), ("b1", "broad")];
    let (p, _hosts) = fleet(policy, &agents).await;
    release_until(&p, "1.0.0", true, Phase::Completed).await;

    let halted = release_until(&p, "2.0.0", false, Phase::Halted).await;
    let reason = halted.reason.unwrap_or_default();
    assert!(reason.contains("ring canary"), "{reason}");
    assert!(
        reason.contains("code Some(3)"),
        "the agents' reason is shown: {reason}"
    );
    // The broad ring never received 2.0.0.
    let bus = p.bus().await.expect("bus");
    let broad = bus
        .desired
        .get(fleetcast_events::names::desired_key("shapp", "broad"))
        .await
        .expect("get")
        .expect("broad desired state");
    let broad: DesiredState = fleetcast_events::Encoding::Json
        .decode(&broad)
        .expect("decode");
    assert_eq!(broad.version, v("1.0.0"));
    let spans = spans(&statuses(&p).await, &v("2.0.0"));
    assert!(spans.iter().all(|s| s.0 != "b1"), "b1 switched: {spans:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_approval_downloads_early_and_an_operator_steers_the_rollout() {
    let policy = AppPolicy {
        approval: Approval::Manual,
        rings: vec![ring("default", 1, 1)],
    };
    let agents = [("h1", "default"), ("h2", "default")];
    let (p, hosts) = fleet(policy, &agents).await;
    let waiting = release_until(&p, "1.0.0", true, Phase::AwaitingApproval).await;
    assert_eq!(waiting.version, v("1.0.0"));
    // Downloaded ahead of the approval, switched by nobody.
    for (id, _) in agents {
        let staged = hosts.path().join(id).join("data/apps/shapp/versions/1.0.0");
        eventually(&format!("{id} downloads early"), || staged.is_dir()).await;
        assert!(
            !hosts.path().join(id).join("state/running").exists(),
            "{id} switched before approval"
        );
    }
    // The inventory says what each host waits for (`fleetcast agents`, the dashboard).
    poll(Duration::from_millis(200), async || {
        let waiting: Vec<Option<String>> = match p.tracker_command(&Command::Status).await {
            Ok(reply) => reply
                .agents
                .iter()
                .map(|a| a.apps.get("shapp").and_then(|app| app.waiting.clone()))
                .collect(),
            Err(_) => Vec::new(),
        };
        let shown = waiting.len() == 2
            && waiting
                .iter()
                .all(|w| w.as_deref().is_some_and(|w| w.contains("approval")));
        if shown {
            Ok(())
        } else {
            Err(format!(
                "hosts never shown waiting for approval: {waiting:?}"
            ))
        }
    })
    .await;
    let wrong = approve(&p, Some("9.9.9")).await;
    assert!(!wrong.ok, "approving another version is refused");
    let approved = approve(&p, None).await;
    assert!(approved.ok, "{}", approved.message);
    // `fleetcast rollout watch` ends when the rollout does.
    let bus = p.cli().await.expect("bus");
    let done = watch(&bus, None).await;
    assert_eq!(done.phase, Phase::Completed);
    assert_eq!(done.rings[0].done, 2);

    // v2: approved, then aborted: the watch reports it and nobody else switches later.
    release_until(&p, "2.0.0", true, Phase::AwaitingApproval).await;
    let paused = p
        .tracker_command(&Command::Pause {
            app: AppName::from_static("shapp"),
        })
        .await
        .expect("pause");
    assert!(paused.ok && paused.rollout.is_some_and(|r| r.paused));
    let aborted = p
        .tracker_command(&Command::Abort {
            app: AppName::from_static("shapp"),
        })
        .await
        .expect("abort");
    assert!(aborted.ok, "{}", aborted.message);
    let ended = watch(&bus, None).await;
    assert_eq!(ended.phase, Phase::Aborted);
    assert_eq!(ended.reason.as_deref(), Some("aborted by an operator"));

    // v3 waits for approval when v4 arrives: whoever waits for v3 (CI's
    // `rollout watch --version 3.0.0`, exit 5) learns that it was superseded.
    release_until(&p, "3.0.0", true, Phase::AwaitingApproval).await;
    p.release("shapp", "4.0.0", &script_app("4.0.0", true))
        .await;
    let superseded = watch(&bus, Some(&v("3.0.0"))).await;
    assert_eq!(superseded.version, v("4.0.0"));
    assert!(superseded.superseded.contains(&v("3.0.0")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracker_restarted_mid_rollout_continues_where_it_was() {
    let policy = auto_approved(vec![ring("canary", 1, 1), ring("broad", 1, 1)]);
    let agents = [("c1", "canary"), ("b1", "broad"), ("b2", "broad")];
    let (mut p, _hosts) = fleet(policy.clone(), &agents).await;
    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    // Stopped as soon as the first host runs 1.0.0, while the others still wait.
    status_of(&p, AppState::Running, "1.0.0").await;
    p.kill("tracker");
    let mut settings = p.tracker_settings();
    settings.apps.insert(AppName::from_static("shapp"), policy);
    p.start_tracker_with(settings);
    let done = rollout_phase(&p, Phase::Completed).await;
    assert_eq!(done.rings.iter().map(|r| r.done).sum::<usize>(), 3);
}

/// `fleetcast rollout watch shapp [--version V]`, bounded in time.
async fn watch(
    bus: &fleetcast_cli::CliBus,
    version: Option<&Version>,
) -> fleetcast_events::tracker::RolloutSummary {
    tokio::time::timeout(
        TIMEOUT,
        fleetcast_cli::watch_rollout(bus, &AppName::from_static("shapp"), version),
    )
    .await
    .expect("the rollout never ended")
    .expect("watch")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_rollouts_and_failures_as_a_person_sees_them() {
    let policy = auto_approved(vec![ring("canary", 1, 1), ring("broad", 2, 1)]);
    let agents = [("c1", "canary"), ("b1", "broad"), ("b2", "broad")];
    let (p, _hosts, port) = fleet_on(policy, &agents).await;
    release_until(&p, "1.0.0", true, Phase::Completed).await;
    release_until(&p, "2.0.0", false, Phase::Halted).await;

    let dom = fleetcast_e2e::dashboard_dom(port).await;

    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page never loaded its data: {dom}"
    );
    assert!(
        dom.contains("3 agents, 0 stale"),
        "fleet summary missing: {dom}"
    );
    assert!(
        dom.contains("<td>shapp</td><td>1.0.0</td><td>broad</td><td>running</td><td>2</td>"),
        "fleet by version and ring: {dom}"
    );
    // The canary that rolled back is a row of its own, not counted with the healthy hosts.
    assert!(
        dom.contains("<td>shapp</td><td>1.0.0</td><td>canary</td><td>rolled back</td><td>1</td>"),
        "a rolled-back host counted as such: {dom}"
    );
    assert!(
        dom.contains("data-connected=\"true\""),
        "a connected tracker shows no banner: {dom}"
    );
    assert!(dom.contains("shapp 2.0.0"), "rollout missing: {dom}");
    assert!(dom.contains("phase halted"), "halted phase missing: {dom}");
    assert!(
        dom.contains("ring canary: 1 of 1 hosts failed"),
        "halt reason missing: {dom}"
    );
    assert!(
        dom.contains("c1: exited during the health gate"),
        "failed host and its reason: {dom}"
    );
    assert!(dom.contains("data-agent=\"b2\""), "agent rows: {dom}");
    // The canary that rolled 2.0.0 back is the one laggard (broad was never reached).
    assert!(
        dom.contains("<tr class=\"laggard\" data-agent=\"c1\"><td>c1</td><td>shapp</td><td>canary</td><td>2.0.0</td><td>1.0.0</td><td><span class=\"lag failing\">failing</span></td>"),
        "laggards: {dom}"
    );
    assert!(
        !dom.contains("class=\"laggard\" data-agent=\"b"),
        "laggards: {dom}"
    );
    // Last seen and each last error as an age; the exact time in the tooltip.
    assert!(dom.contains(" ago</span>"), "ages: {dom}");
    assert!(
        dom.contains("exited during the health gate ("),
        "the last error says when: {dom}"
    );

    // The same view for machines.
    let metrics = fleetcast_e2e::http_get(port, "/metrics");
    assert!(
        metrics.contains(
            "fleetcast_rollout_phase{app=\"shapp\",version=\"2.0.0\",phase=\"halted\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleetcast_agents{state=\"live\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleetcast_rollout_hosts{app=\"shapp\",version=\"2.0.0\",ring=\"canary\",result=\"failed\"} 1"),
        "{metrics}"
    );
    let broad: serde_json::Value =
        serde_json::from_str(&fleetcast_e2e::http_get(port, "/api/agents?ring=broad"))
            .expect("json");
    assert_eq!(broad.as_array().map(Vec::len), Some(2), "{broad}");
    // Each agent says which fleetcast it is, in the API and on the page.
    assert_eq!(
        broad[0]["agent_version"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "{broad}"
    );
    assert!(
        dom.contains(&format!(
            "<span class=\"agent-version\">{}</span>",
            env!("CARGO_PKG_VERSION")
        )),
        "agent versions: {dom}"
    );
}

/// One ring of three hosts, `h1` to `h3`.
fn three_hosts() -> AppPolicy {
    auto_approved(vec![ring("default", 3, 1)])
}
const THREE_AGENTS: [(&str, &str); 3] = [("h1", "default"), ("h2", "default"), ("h3", "default")];

/// 1.0.0 rolls out to the three hosts; h3's host goes down and the tracker marks it stale
/// (stale_after is 5 s in the tests); 2.0.0 rolls out without it. The completed rollout.
async fn h3_left_behind(p: &mut Pipeline) -> fleetcast_events::tracker::RolloutSummary {
    release_until(p, "1.0.0", true, Phase::Completed).await;
    p.stop("agent-h3").await;
    agent_stale(p, "h3", true).await;
    release_until(p, "2.0.0", true, Phase::Completed).await
}

/// Waits until the tracker sees agent `id` as stale (`true`) or live (`false`).
async fn agent_stale(p: &Pipeline, id: &str, stale: bool) {
    poll(Duration::from_millis(200), async || {
        match p.tracker_command(&Command::Status).await {
            Ok(reply)
                if reply
                    .agents
                    .iter()
                    .any(|a| a.agent_id == id && a.stale == stale) =>
            {
                Ok(())
            }
            _ => Err(format!("{id} never stale={stale}")),
        }
    })
    .await
}

/// The version host `id`'s app runs.
fn running(hosts: &tempfile::TempDir, id: &str) -> String {
    fleetcast_e2e::running(&hosts.path().join(id).join("state"))
}

async fn converged(hosts: &tempfile::TempDir, id: &str, version: &str) {
    eventually(&format!("{id} runs {version}"), || {
        running(hosts, id) == version
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_host_does_not_block_completion_and_converges_when_it_returns() {
    let (mut p, hosts) = fleet(three_hosts(), &THREE_AGENTS).await;
    let done = h3_left_behind(&mut p).await;
    assert_eq!(done.version, v("2.0.0"));
    assert_eq!(
        (
            done.rings[0].targets,
            done.rings[0].done,
            done.rings[0].stale
        ),
        (2, 2, 1)
    );
    assert_eq!(running(&hosts, "h3"), "1.0.0");
    // The one host behind, and why.
    let laggards = p
        .tracker_command(&Command::Laggards {
            app: Some(AppName::from_static("shapp")),
        })
        .await
        .expect("laggards")
        .laggards;
    assert_eq!(
        laggards
            .iter()
            .map(|l| (l.agent_id.as_str(), l.lag.kind(), l.running.clone()))
            .collect::<Vec<_>>(),
        [("h3", "offline", Some(v("1.0.0")))],
        "{laggards:?}"
    );

    // It comes back: it reads its desired state, gets a slot and converges.
    let settings = p.agent_settings("h3", "default", &hosts.path().join("h3"));
    p.start_agent(settings);
    converged(&hosts, "h3", "2.0.0").await;
    agent_stale(&p, "h3", false).await;
    // Once the tracker hears it runs 2.0.0, nobody lags.
    until(
        Duration::from_millis(100),
        "no laggard",
        async || {
            p.tracker_command(&Command::Laggards { app: None })
                .await
                .expect("laggards")
                .laggards
        },
        |laggards| laggards.is_empty(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_cut_off_from_nats_during_the_announcement_converge_after_reconnecting() {
    use fleetcast_harness::proxy::Proxy;
    let mut p = Pipeline::start().await.expect("pipeline");
    let mut settings = p.tracker_settings();
    settings.stale_after = Duration::from_secs(60);
    p.start_tracker_with(settings);
    let hosts = tempfile::tempdir().expect("tmp");
    // h2 and h3 reach NATS through proxies that can cut their link.
    let mut proxies = Vec::new();
    for id in ["h1", "h2", "h3"] {
        let mut s = p.agent_settings(id, "default", &hosts.path().join(id));
        if id != "h1" {
            let proxy = Proxy::start(p.nats.addr()).await.expect("proxy");
            s.nats.url = proxy.url();
            proxies.push(proxy);
        }
        p.start_agent(s);
    }
    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    for id in ["h1", "h2", "h3"] {
        converged(&hosts, id, "1.0.0").await;
    }

    for proxy in &proxies {
        proxy.cut();
    }
    p.release("shapp", "2.0.0", &script_app("2.0.0", true))
        .await;
    converged(&hosts, "h1", "2.0.0").await;
    assert_eq!(running(&hosts, "h2"), "1.0.0", "h2 updated while cut off");
    for proxy in &proxies {
        proxy.restore();
    }
    for id in ["h2", "h3"] {
        converged(&hosts, id, "2.0.0").await;
    }
    let done = rollout_phase(&p, Phase::Completed).await;
    assert_eq!(done.rings[0].done, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_goes_through_the_signer_and_rolls_out_ring_by_ring() {
    let policy = auto_approved(vec![ring("canary", 1, 1), ring("broad", 2, 1)]);
    let agents = [("c1", "canary"), ("b1", "broad"), ("b2", "broad")];
    let (p, hosts) = fleet(policy, &agents).await;
    release_until(&p, "1.0.0", true, Phase::Completed).await;
    let v2 = release_until(&p, "2.0.0", true, Phase::Completed).await;
    assert_eq!(v2.version, v("2.0.0"));

    // One ring first: only the canary goes back.
    let bus = p.cli().await.expect("bus");
    let from = fleetcast_cli::request_rollback(
        &bus,
        &AppName::from_static("shapp"),
        &v("1.0.0"),
        Some(&RingName::from_static("canary")),
    )
    .await
    .expect("rollback");
    assert_eq!(from, v("2.0.0"));
    let back = watch(&bus, Some(&v("1.0.0"))).await;
    assert_eq!(back.phase, Phase::Completed);
    assert!(back.rollback, "carried by the signer's directive");
    converged(&hosts, "c1", "1.0.0").await;
    assert_eq!(
        running(&hosts, "b1"),
        "2.0.0",
        "the broad ring was not rolled back"
    );

    // Then the whole app.
    fleetcast_cli::request_rollback(&bus, &AppName::from_static("shapp"), &v("1.0.0"), None)
        .await
        .expect("rollback");
    for id in ["b1", "b2"] {
        converged(&hosts, id, "1.0.0").await;
    }
    // A rollback to a version never stored is refused before anything is signed.
    assert!(
        fleetcast_cli::request_rollback(&bus, &AppName::from_static("shapp"), &v("0.5.0"), None)
            .await
            .is_err()
    );
}

/// A ring outside its maintenance window downloads the release early but switches nobody; each
/// host says why it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_outside_its_maintenance_window_downloads_but_does_not_switch() {
    let hour = time::OffsetDateTime::now_utc().hour();
    // One hour that starts two hours from now (UTC): closed for the whole test.
    let window = format!("{:02}:00-{:02}:00", (hour + 2) % 24, (hour + 3) % 24);
    let policy = auto_approved(vec![RingPolicy {
        windows: vec![window],
        ..ring("default", 2, 1)
    }]);
    let agents = [("h1", "default"), ("h2", "default")];
    let (p, hosts) = fleet(policy, &agents).await;
    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    for (id, _) in agents {
        let waiting = p
            .wait_status(|s: &AgentStatus| {
                s.agent_id == id
                    && s.state == AppState::WaitingForSlot
                    && s.reason
                        .as_deref()
                        .is_some_and(|r| r.contains("maintenance window"))
            })
            .await
            .expect("waits for the window");
        assert_eq!(waiting.version, Some(v("1.0.0")));
        assert!(
            hosts
                .path()
                .join(id)
                .join("data/apps/shapp/versions/1.0.0")
                .is_dir(),
            "{id} downloaded early"
        );
        assert_eq!(running(&hosts, id), "", "{id} switched outside the window");
    }
    let view = rollout_phase(&p, Phase::Running).await;
    assert_eq!(view.rings[0].done, 0);
}

/// Production runs NATS as a 3-node JetStream cluster with every stream and bucket replicated
/// three times: a node lost in the middle of a rollout must not stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_completes_when_a_node_of_the_nats_cluster_dies_in_the_middle() {
    let mut p = Pipeline::new_cluster(3).await.expect("cluster");
    p.start_watcher();
    p.start_signer();
    p.start_distributor("distributor-1");
    p.start_distributor("distributor-2");
    let policy = auto_approved(vec![ring("canary", 1, 1), ring("broad", 1, 1)]);
    let agents = [("c1", "canary"), ("b1", "broad"), ("b2", "broad")];
    // Agents' reports pause while the cluster moves the lost node's leaderships (seconds):
    // they must not count as gone meanwhile, or their ring would complete without them.
    let settings = fleetcast_tracker::Settings {
        stale_after: Duration::from_secs(60),
        ..p.tracker_settings()
    };
    let (hosts, _) = fleet_in(&mut p, settings, policy, &agents).await;
    let bus = p.bus().await.expect("bus");
    let replicas = bus
        .desired
        .stream
        .clone()
        .info()
        .await
        .expect("info")
        .config
        .num_replicas;
    assert_eq!(replicas, 3, "buckets are replicated on every node");

    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    for (id, _) in agents {
        converged(&hosts, id, "1.0.0").await;
    }
    p.release("shapp", "2.0.0", &script_app("2.0.0", true))
        .await;
    // Killed once the canary runs 2.0.0, with the broad ring still to come (one at a time).
    converged(&hosts, "c1", "2.0.0").await;
    assert_ne!(
        running(&hosts, "b2"),
        "2.0.0",
        "the broad ring had not finished"
    );
    // The node killed is the status stream's leader: it also holds the tracker's consumer of
    // agent reports (an ordered consumer has one replica), which must be replaced.
    let leader = bus
        .status_stream
        .clone()
        .info()
        .await
        .expect("info")
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("status stream leader");
    match leader
        .strip_prefix('n')
        .and_then(|i| i.parse::<usize>().ok())
    {
        Some(0) => p.nats.stop(),
        Some(i) => p.cluster[i - 1].stop(),
        None => panic!("unknown node {leader}"),
    }
    for (id, _) in agents {
        converged(&hosts, id, "2.0.0").await;
    }
    let done = rollout_phase(&p, Phase::Completed).await;
    assert_eq!(done.version, v("2.0.0"));
    assert_eq!(done.rings.iter().map(|r| r.done).sum::<usize>(), 3);
    assert_eq!(done.rings.iter().map(|r| r.stale).sum::<usize>(), 0);
    // The pipeline's consumers (watcher, signer, distributors, the tracker's) lost whatever
    // pull was waiting on the dead node: the next release still goes all the way.
    p.release("shapp", "3.0.0", &script_app("3.0.0", true))
        .await;
    for (id, _) in agents {
        converged(&hosts, id, "3.0.0").await;
    }
}

/// While the tracker is cut off from NATS, the page a person looks at says so, and since
/// when its data is old, instead of looking live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_says_when_the_tracker_is_cut_off_from_nats() {
    let policy = auto_approved(vec![ring("canary", 1, 1)]);
    let (mut p, _hosts, port) = fleet_on(policy, &[("c1", "canary")]).await;
    let live = fleetcast_e2e::dashboard_dom(port).await;
    assert!(live.contains("data-connected=\"true\""), "{live}");
    assert!(
        live.contains("<div id=\"banner\" role=\"alert\" class=\"\"></div>")
            || live.contains("<div id=\"banner\" role=\"alert\"></div>"),
        "no banner while connected: {live}"
    );

    p.nats.stop();
    fleetcast_e2e::eventually("the tracker reports it is cut off", || {
        fleetcast_e2e::http_get(port, "/health").trim() != "ok"
    })
    .await;
    let dom = fleetcast_e2e::dashboard_dom(port).await;
    assert!(dom.contains("data-connected=\"false\""), "{dom}");
    assert!(
        dom.contains("class=\"shown\">The tracker is cut off from NATS"),
        "no banner while cut off: {dom}"
    );
    assert!(
        dom.contains("nothing was seen live yet") || dom.contains("what you see is as of"),
        "{dom}"
    );
}

/// The tracker's only laggard (there must be exactly one).
async fn the_one_laggard(p: &Pipeline) -> fleetcast_events::tracker::Laggard {
    let laggards = p
        .tracker_command(&Command::Laggards { app: None })
        .await
        .expect("laggards")
        .laggards;
    assert_eq!(laggards.len(), 1, "{laggards:?}");
    laggards[0].clone()
}

/// The query for `shapp`'s history entries of `kind`, and those entries once there are at
/// least `count`.
async fn shapp_history(
    p: &Pipeline,
    kind: fleetcast_events::v1::HistoryKind,
    count: usize,
) -> (
    fleetcast_events::tracker::HistoryQuery,
    Vec<fleetcast_events::v1::HistoryEntry>,
) {
    let query = fleetcast_events::tracker::HistoryQuery {
        app: Some(AppName::from_static("shapp")),
        kind: Some(kind),
        version: None,
        actor: None,
        limit: None,
    };
    let history = until(
        Duration::from_millis(200),
        &format!("{count} {kind} entries"),
        async || {
            p.tracker_command(&Command::History(query.clone()))
                .await
                .expect("history")
                .history
        },
        |history| history.len() >= count,
    )
    .await;
    (query, history)
}

/// A host offline past `replace.after` in a ring that still has healthy hosts: the replacement
/// hook is called for it once, with its identity, and the call is in the history; in dry run,
/// only the history says what would have been called.
async fn an_offline_laggard_is_replaced(dry_run: bool) {
    let mut p = Pipeline::start().await.expect("pipeline");
    let calls = tempfile::tempdir().expect("tmp");
    let log = calls.path().join("replaced");
    let mut settings = p.tracker_settings();
    settings.replace = fleetcast_tracker::laggards::ReplaceSettings {
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            format!(
                "echo \"$FLEETCAST_REPLACE_AGENT $FLEETCAST_REPLACE_RING $FLEETCAST_REPLACE_LAG\" >> {}",
                log.display()
            ),
        ],
        after: Duration::from_secs(1),
        dry_run,
        ..Default::default()
    };
    let (_hosts, _) = fleet_in(&mut p, settings, three_hosts(), &THREE_AGENTS).await;
    h3_left_behind(&mut p).await;

    let (query, history) =
        shapp_history(&p, fleetcast_events::v1::HistoryKind::HostReplaced, 1).await;
    let entry = history[0].clone();
    assert_eq!(entry.agent.as_deref(), Some("h3"));
    let reason = entry.reason.unwrap_or_default();
    // A few more ticks: still called once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let history = p
        .tracker_command(&Command::History(query))
        .await
        .expect("history")
        .history;
    assert_eq!(history.len(), 1, "{history:?}");
    // The laggard says what was done about it.
    let laggard = the_one_laggard(&p).await;
    assert!(
        laggard
            .remediation
            .as_deref()
            .is_some_and(|r| r.starts_with("replacement")),
        "{laggard:?}"
    );
    if dry_run {
        assert_eq!(reason, "offline: dry run, nothing called");
        assert!(!log.exists(), "a dry run called the hook");
    } else {
        assert_eq!(reason, "offline: called, exit 0");
        assert_eq!(
            std::fs::read_to_string(&log).expect("the hook ran"),
            "h3 default offline\n"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_laggard_is_replaced_once_by_the_hook() {
    an_offline_laggard_is_replaced(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_of_the_replacement_hook_calls_nothing() {
    an_offline_laggard_is_replaced(true).await;
}

/// A host online but stuck behind its ring (here: its agent waits a minute before it fetches
/// anything, `fetch_delay`): the tracker asks its agent to retry now, then to restart, each
/// once, on the agent's own subject; each is in the history and the laggard says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_host_is_asked_to_retry_then_to_restart() {
    use fleetcast_events::v1::{AgentRemedy, HistoryKind, RemedyAction};
    let mut p = Pipeline::start().await.expect("pipeline");
    let mut settings = p.tracker_settings();
    settings.stuck_after = Duration::from_secs(1);
    settings.remedy = fleetcast_tracker::laggards::RemedySettings {
        enabled: true,
        retry_after: Duration::from_secs(1),
        restart_after: Duration::from_secs(3),
    };
    p.start_tracker_with(settings);
    let hosts = tempfile::tempdir().expect("tmp");
    let mut agent = p.agent_settings("h1", "default", &hosts.path().join("h1"));
    agent.fetch_delay = Duration::from_secs(60);
    p.start_agent(agent);
    let bus = p.bus().await.expect("bus");
    let mut remedies = bus
        .client
        .subscribe(fleetcast_events::names::remedy_subject("h1"))
        .await
        .expect("subscribe");
    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;

    let mut actions = Vec::new();
    while actions.len() < 2 {
        let message = tokio::time::timeout(TIMEOUT, remedies.next())
            .await
            .expect("a remedy in time")
            .expect("subscription");
        let remedy: AgentRemedy = serde_json::from_slice(&message.payload).expect("a remedy");
        assert_eq!(remedy.agent_id, "h1");
        actions.push(remedy.action);
    }
    assert_eq!(
        actions,
        [
            RemedyAction::Retry {
                app: AppName::from_static("shapp")
            },
            RemedyAction::Restart
        ]
    );
    let (_, history) = shapp_history(&p, HistoryKind::HostRemedied, 2).await;
    let mut reasons: Vec<String> = history.iter().filter_map(|e| e.reason.clone()).collect();
    reasons.sort();
    assert_eq!(
        reasons,
        ["stuck: agent asked to restart", "stuck: asked to retry now"]
    );
    // Once each: nothing more a few ticks later.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), remedies.next())
            .await
            .is_err(),
        "a remedy sent twice"
    );
    assert_eq!(
        the_one_laggard(&p).await.remediation.as_deref(),
        Some("agent asked to restart")
    );
}
