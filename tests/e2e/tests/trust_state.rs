//! Issue 16, what a host or an operator's typo must not be able to bend: a chain of links that
//! climbs out of its package is refused by the watcher; a rollback request whose `from` is not
//! the app's latest signed version is refused by the signer; one app whose journal is
//! unreadable is isolated while the other apps on the host keep running and updating. (The
//! saved trust state and the clock checks are unit tests of `fleetcast_runtime::trust`.)

use fleetcast_events::AppName;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetcast_e2e::{Pipeline, eventually, running, script_app};
use fleetcast_events::Encoding;
use fleetcast_events::names::{EVENT_REJECTED, PACKAGE_REJECTED, ROLLBACK_SIGNED};
use fleetcast_events::v1::{
    AgentHeartbeat, AgentStatus, AppState, EventRejected, PackageRejected, PackageSource,
    RejectCode, RollbackRequested, RollbackSigned,
};
use fleetcast_harness::fixtures::hostile;
use semver::Version;
use tokio_util::sync::CancellationToken;

fn v(s: &str) -> Version {
    Version::parse(s).expect("version")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_links_that_climbs_out_is_refused_by_the_watcher() {
    let p = Pipeline::start().await.expect("pipeline");
    std::fs::create_dir_all(p.drop_dir()).expect("drop dir");
    let name = "chain-1.0.0.zip";
    std::fs::write(p.drop_dir().join(name), hostile::symlink_chain_outside()).expect("drop");
    let rejected: PackageRejected = p
        .wait_event(PACKAGE_REJECTED, move |e: &PackageRejected| {
            matches!(&e.source, PackageSource::DropFolder { file } if file == name)
        })
        .await
        .expect("rejected");
    assert_eq!(
        rejected.reason.code,
        RejectCode::LinkOutsidePackage,
        "{}",
        rejected.reason.message
    );
    assert!(
        rejected.reason.message.contains("leaves the package"),
        "{}",
        rejected.reason.message
    );
}

async fn request_rollback(p: &Pipeline, to: &str, from: &str) {
    let bus = p.bus().await.expect("bus");
    let request = RollbackRequested {
        app: AppName::from_static("shapp"),
        to: v(to),
        from: v(from),
        ring: None,
        requested_by: "test".into(),
    };
    bus.publish_event(
        &fleetcast_events::names::rollback_requested_subject("test"),
        &request,
        Encoding::Json,
        Some(&format!("rollback-test.{to}.{from}")),
    )
    .await
    .expect("requested");
}

/// `from=99.0.0` (a typo) would raise every agent's highest accepted version to 99.0.0 and
/// block every release below it: refused with its reason. So is a `from` below the latest
/// signed version (it would leave the latest one standing). The latest one is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_from_other_than_the_latest_signed_version_is_refused() {
    let p = Pipeline::start().await.expect("pipeline");
    for version in ["1.0.0", "1.1.0", "2.0.0"] {
        p.release("shapp", version, &script_app(version, true))
            .await;
    }
    for from in ["99.0.0", "1.1.0"] {
        request_rollback(&p, "1.0.0", from).await;
        let refused: EventRejected = p
            .wait_event(EVENT_REJECTED, move |e: &EventRejected| {
                e.subject == fleetcast_events::names::rollback_requested_subject("test")
                    && e.reason.message.contains(from)
            })
            .await
            .expect("refused");
        assert_eq!(refused.stage, "signer");
        assert_eq!(refused.reason.code, RejectCode::RollbackFromNotLatest);
        assert!(
            refused
                .reason
                .message
                .contains("the latest version signed is 2.0.0"),
            "{}",
            refused.reason.message
        );
    }
    request_rollback(&p, "1.0.0", "2.0.0").await;
    let signed: RollbackSigned = p
        .wait_event(ROLLBACK_SIGNED, |e: &RollbackSigned| e.to == v("1.0.0"))
        .await
        .expect("signed");
    assert_eq!(signed.from, v("2.0.0"));
    // Nothing was signed for the refused ones.
    assert_eq!(
        p.count_events(ROLLBACK_SIGNED).await.expect("count"),
        1,
        "only the rollback from the latest version is signed"
    );
}

/// A running agent; `stop` waits until it has stopped its apps.
struct Agent(CancellationToken, tokio::task::JoinHandle<()>);

impl Agent {
    async fn stop(self) {
        self.0.cancel();
        self.1.await.expect("agent task");
    }
}

/// One host supervising `shapp` and `other` (each a [`script_app`] writing to its own state
/// folder), re-reading what it could not set up every second.
fn start_two_apps(p: &Pipeline, host: &Path) -> (Agent, PathBuf, PathBuf) {
    let mut settings = p.agent_settings("host-2", "default", host);
    settings.recheck = Duration::from_secs(1);
    let shapp_state = host.join("state");
    let other_state = host.join("state-other");
    std::fs::create_dir_all(&other_state).expect("state");
    let mut other = settings.apps[0].clone();
    other.name = AppName::from_static("other");
    other
        .env
        .insert("STATE_DIR".into(), other_state.display().to_string());
    settings.apps.push(other);
    let token = CancellationToken::new();
    let t = token.clone();
    let agent = Agent(
        token,
        tokio::spawn(async move { fleetcast_agent::run(settings, t).await.expect("agent") }),
    );
    (agent, shapp_state, other_state)
}

/// Both journal slots of one app torn (damage no crash makes): before, the agent stopped, and
/// with it every app on the host, in a restart loop. Now that app alone is reported failed and
/// left alone; the other keeps running and takes an update; once the journal is repaired the
/// app is supervised again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_apps_torn_journal_isolates_that_app_only() {
    let p = Pipeline::start().await.expect("pipeline");
    let host = tempfile::tempdir().expect("tmp");
    for app in ["shapp", "other"] {
        p.release(app, "1.0.0", &script_app("1.0.0", true)).await;
        p.desire(app, "default", "1.0.0").await;
    }
    let (agent, shapp_state, other_state) = start_two_apps(&p, host.path());
    eventually("both on 1.0.0", || {
        running(&shapp_state) == "1.0.0" && running(&other_state) == "1.0.0"
    })
    .await;
    agent.stop().await;

    let journal = host.path().join("data/apps/shapp");
    for slot in ["journal.a", "journal.b"] {
        // Both written torn (a missing slot next to a torn one reads as a first save cut
        // short, which is not this damage).
        std::fs::write(journal.join(slot), b"fleetcast-journal 7 3 0000\n{x").expect("tear");
    }
    assert!(
        fleetcast_agent::journal::Journal::load(&journal).is_err(),
        "both slots torn"
    );
    for state in [&shapp_state, &other_state] {
        std::fs::remove_file(state.join("running")).expect("reset marker");
    }

    let (agent, _, _) = start_two_apps(&p, host.path());
    let failed: AgentStatus = p
        .wait_status(|s: &AgentStatus| {
            s.agent_id == "host-2" && s.app == "shapp" && s.state == AppState::Failed
        })
        .await
        .expect("shapp reported failed");
    let reason = failed.reason.unwrap_or_default();
    assert!(
        reason.contains("isolated") && reason.contains("journal"),
        "{reason}"
    );
    let beat: AgentHeartbeat = p
        .wait_status(|b: &AgentHeartbeat| {
            b.agent_id == "host-2"
                && b.apps
                    .iter()
                    .any(|a| a.app == "shapp" && a.state == AppState::Failed)
                && b.apps
                    .iter()
                    .any(|a| a.app == "other" && a.state == AppState::Running)
        })
        .await
        .expect("heartbeat: shapp failed, other running");
    assert_eq!(beat.apps.len(), 2);
    eventually("other runs again", || running(&other_state) == "1.0.0").await;

    // The other app updates; the isolated one is neither started nor updated.
    for app in ["shapp", "other"] {
        p.release(app, "2.0.0", &script_app("2.0.0", true)).await;
        p.desire(app, "default", "2.0.0").await;
    }
    eventually("other on 2.0.0", || running(&other_state) == "2.0.0").await;
    assert_eq!(running(&shapp_state), "", "the isolated app was started");
    assert!(
        !host.path().join("data/apps/shapp/versions/2.0.0").exists(),
        "the isolated app was updated"
    );

    // Repaired (here: the journal removed, as an operator who checked the host may): the
    // app is set up again on the next re-check and brought to its desired version.
    for slot in ["journal.a", "journal.b"] {
        let _ = std::fs::remove_file(journal.join(slot));
    }
    eventually("shapp on 2.0.0 once repaired", || {
        running(&shapp_state) == "2.0.0"
    })
    .await;
    agent.stop().await;
}
