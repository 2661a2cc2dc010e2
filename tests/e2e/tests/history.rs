//! The history and audit trail, on the shipped secure configuration: every release step and
//! rejection, every rollout transition, every host that rolled back and every operator action
//! is recorded once, with who did it as the server authenticated them (the NATS user whose
//! credential alone may publish on the subject), never what a message claims.

use fleetcast_events::AppName;
use std::time::Duration;

use fleetcast_cli::CliBus;
use fleetcast_e2e::checks::{closed_pipeline, publish, until};
use fleetcast_e2e::{eventually, ring, running, script_app};
use fleetcast_events::names;
use fleetcast_events::tracker::{Command, HistoryQuery};
use fleetcast_events::v1::{HistoryEntry, HistoryKind, RejectCode};
use fleetcast_harness::accounts::AgentSpec;
use fleetcast_runtime::NatsSettings;
use fleetcast_tracker::policy::{AppPolicy, Approval};

fn v(s: &str) -> semver::Version {
    s.parse().expect("version")
}

async fn bus_with(settings: NatsSettings) -> CliBus {
    fleetcast_cli::connect(&settings, Duration::from_secs(20))
        .await
        .expect("connects")
}

async fn history(bus: &CliBus, query: HistoryQuery) -> Vec<HistoryEntry> {
    let reply = fleetcast_cli::tracker(bus, &Command::History(query))
        .await
        .expect("tracker answers");
    assert!(reply.ok, "{}", reply.message);
    reply.history
}

/// Waits until the history holds an entry `matching`, and returns every entry of the app.
async fn wait_for(
    bus: &CliBus,
    what: &str,
    matching: impl Fn(&HistoryEntry) -> bool,
) -> Vec<HistoryEntry> {
    let query = HistoryQuery {
        app: Some(AppName::from_static("shapp")),
        limit: Some(1000),
        ..Default::default()
    };
    until(
        Duration::from_millis(200),
        &format!("{what} in the history"),
        async || history(bus, query.clone()).await,
        |all| all.iter().any(&matching),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_and_action_is_recorded_once_with_who_did_it() {
    let mut p = closed_pipeline(&[AgentSpec::new("h1", "default", &["shapp"])]).await;
    let mut settings = p.tracker_settings();
    settings.apps.insert(
        AppName::from_static("shapp"),
        AppPolicy {
            approval: Approval::Manual,
            rings: vec![ring("default", 1, 1)],
        },
    );
    p.start_tracker_as_role(settings);
    let hosts = tempfile::tempdir().expect("tmp");
    let agent = p.agent_settings("h1", "default", &hosts.path().join("h1"));
    p.start_agent_as_itself(agent);

    let accounts = p.accounts.as_ref().expect("accounts");
    let alice_creds = accounts.add_person("alice", "operator").expect("alice");
    let job_creds = accounts.add_person("build-42", "ci").expect("ci job");
    let alice = bus_with(NatsSettings {
        credentials: Some(alice_creds.clone()),
        ..p.nats_settings_as("operator")
    })
    .await;
    let job = bus_with(NatsSettings {
        credentials: Some(job_creds),
        ..p.nats_settings_as("ci")
    })
    .await;
    assert_eq!(
        (alice.user.as_str(), job.user.as_str()),
        ("alice", "build-42")
    );

    // The CI job publishes 1.0.0; the body claims somebody else published it.
    let zip = hosts.path().join("shapp-1.0.0.zip");
    script_app("1.0.0", true).write_to(&zip).expect("zip");
    let published = publish(&job, &zip, Some("alice")).await.expect("published");
    wait_for(&job, "rollout.started", |e| {
        e.kind == HistoryKind::RolloutStarted
    })
    .await;

    // Alice approves; she also asks for an app that has no rollout (refused).
    let approve = Command::Approve {
        app: AppName::from_static("shapp"),
        version: Some(v("1.0.0")),
        target: None,
    };
    let reply = fleetcast_cli::tracker(&alice, &approve)
        .await
        .expect("approve");
    assert!(reply.ok, "{}", reply.message);
    let reply = fleetcast_cli::tracker(
        &alice,
        &Command::Pause {
            app: AppName::from_static("nosuch"),
        },
    )
    .await
    .expect("pause");
    assert!(!reply.ok);
    let state = hosts.path().join("h1").join("state");
    eventually("h1 runs 1.0.0", || running(&state) == "1.0.0").await;

    // Another archive reusing 1.0.0: refused by the signer.
    let other = hosts.path().join("other").join("shapp-1.0.0.zip");
    std::fs::create_dir_all(other.parent().expect("parent")).expect("dir");
    script_app("1.0.0", false).write_to(&other).expect("zip");
    let refused = publish(&job, &other, None).await.expect("published");

    // 1.1.0 fails its health check: h1 goes back by itself and the rollout halts.
    p.release("shapp", "1.1.0", &script_app("1.1.0", false))
        .await;
    // The test sees the release stored when the tracker does, not after it: approve only
    // once the tracker has started the rollout.
    wait_for(&job, "rollout.started of 1.1.0", |e| {
        e.kind == HistoryKind::RolloutStarted && e.version == Some(v("1.1.0"))
    })
    .await;
    let reply = fleetcast_cli::tracker(
        &alice,
        &Command::Approve {
            app: AppName::from_static("shapp"),
            version: Some(v("1.1.0")),
            target: None,
        },
    )
    .await
    .expect("approve 1.1.0");
    assert!(reply.ok, "{}", reply.message);
    let all = wait_for(&job, "rollout.halted", |e| {
        e.kind == HistoryKind::RolloutHalted && e.version == Some(v("1.1.0"))
    })
    .await;
    // Settle, then read again: nothing may appear twice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = {
        let again = wait_for(&job, "the same", |e| e.kind == HistoryKind::RolloutHalted).await;
        assert!(again.len() >= all.len());
        again
    };
    let count = |f: &dyn Fn(&HistoryEntry) -> bool| all.iter().filter(|e| f(e)).count();
    let one = |what: &str, f: &dyn Fn(&HistoryEntry) -> bool| {
        assert_eq!(count(f), 1, "{what} recorded once: {all:#?}");
    };
    one(
        "the announcement, by the CI job's identity (not the body's claim)",
        &|e| {
            e.kind == HistoryKind::ReleasePublished
                && e.blake3.as_deref() == Some(published.blake3.as_str())
                && e.actor.as_deref() == Some("build-42")
        },
    );
    one("alice's approval", &|e| {
        e.kind == HistoryKind::OperatorAction
            && e.action.as_deref() == Some("approve")
            && e.version == Some(v("1.0.0"))
            && e.actor.as_deref() == Some("alice")
            && !e.refused
    });
    one("the store of 1.0.0", &|e| {
        e.kind == HistoryKind::ReleaseStored && e.version == Some(v("1.0.0"))
    });
    one("the other archive's rejection, with its code", &|e| {
        e.kind == HistoryKind::ReleaseRejected
            && e.blake3.as_deref() == Some(refused.blake3.as_str())
            && e.code == Some(RejectCode::VersionNotNewer)
    });
    for kind in [
        HistoryKind::RolloutStarted,
        HistoryKind::RingStarted,
        HistoryKind::RingCompleted,
        HistoryKind::RolloutCompleted,
    ] {
        one(&format!("{kind} of 1.0.0"), &|e| {
            e.kind == kind && e.version == Some(v("1.0.0"))
        });
    }
    one("h1 going back from 1.1.0", &|e| {
        e.kind == HistoryKind::HostRolledBack
            && e.agent.as_deref() == Some("h1")
            && e.version == Some(v("1.1.0"))
    });
    one(
        "the halt of 1.1.0, with the failing host in its reason",
        &|e| {
            e.kind == HistoryKind::RolloutHalted
                && e.version == Some(v("1.1.0"))
                && e.reason.as_deref().is_some_and(|r| r.contains("h1"))
        },
    );
    // In the order they happened (the listing is by time).
    let position = |kind: HistoryKind| {
        all.iter()
            .position(|e| e.kind == kind && e.version == Some(v("1.0.0")))
    };
    assert!(position(HistoryKind::ReleaseStored) < position(HistoryKind::RolloutStarted));
    assert!(position(HistoryKind::RolloutStarted) < position(HistoryKind::RolloutCompleted));

    // The refused action is recorded too, with nothing about an app that does not exist.
    let actions = history(
        &job,
        HistoryQuery {
            kind: Some(HistoryKind::OperatorAction),
            actor: Some("alice".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        actions
            .iter()
            .filter(|e| e.refused && e.action.as_deref() == Some("pause"))
            .count(),
        1,
        "{actions:#?}"
    );

    // Alice cannot steer as somebody else: the server refuses the subject.
    let (client, violations) = p.client_as(&alice_creds, None).await;
    client
        .publish(
            names::tracker_command_subject("bob"),
            serde_json::to_vec(&approve).expect("json").into(),
        )
        .await
        .expect("sent");
    violations
        .publish_refused(&names::tracker_command_subject("bob"))
        .await;
}
