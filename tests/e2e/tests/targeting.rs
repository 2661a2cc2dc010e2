//! Targeting by labels, with real agents and the `fleetcast` binary: a rollout approved
//! `--where role=web` switches only the hosts whose agents carry that label; the others keep
//! what they run, are told why, and are nobody's laggards. `fleetcast agents --where` and
//! `/api/agents?where=` list the hosts a selector picks, and refuse one that is not a selector;
//! the dashboard shows the rollout's target and filters its agents the same way.

use std::process::Output;
use std::time::Duration;

use fleetcast_e2e::binaries::binary;
use fleetcast_e2e::browser::Browser;
use fleetcast_e2e::checks::{approve, until};
use fleetcast_e2e::{
    LabelledAgent, Pipeline, eventually, fleet_labelled_in, http_get, http_request, ring,
    rollout_phase, running, script_app,
};
use fleetcast_events::AppName;
use fleetcast_events::tracker::{AgentSummary, Command, HistoryQuery, Phase};
use fleetcast_events::v1::HistoryKind;
use fleetcast_harness::cli::text;
use fleetcast_tracker::policy::{AppPolicy, Approval};

async fn fleetcast(args: &[&str], nats_url: &str) -> Output {
    let mut cmd = tokio::process::Command::from(fleetcast_harness::cli::command(
        binary("fleetcast"),
        args,
        nats_url,
    ));
    cmd.kill_on_drop(true);
    cmd.output().await.expect("run fleetcast")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_where_role_is_web_reaches_only_the_web_hosts() {
    let policy = AppPolicy {
        approval: Approval::Manual,
        rings: vec![ring("default", 2, 1)],
    };
    let mut p = Pipeline::start().await.expect("pipeline");
    let settings = p.tracker_settings();
    let web = [("role", "web")];
    let db = [("role", "db")];
    let agents: [LabelledAgent; 3] = [
        ("w1", "default", &web),
        ("w2", "default", &web),
        ("d1", "default", &db),
    ];
    let (hosts, port) = fleet_labelled_in(&mut p, settings, policy, &agents).await;
    let url = p.nats.url();
    let state = |id: &str| hosts.path().join(id).join("state");

    // Everyone runs 1.0.0 first (approved for every host).
    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    rollout_phase(&p, Phase::AwaitingApproval).await;
    assert!(approve(&p, Some("1.0.0")).await.ok);
    rollout_phase(&p, Phase::Completed).await;

    // 2.0.0 for the web hosts only, approved through the CLI as an operator would.
    p.release("shapp", "2.0.0", &script_app("2.0.0", true))
        .await;
    rollout_phase(&p, Phase::AwaitingApproval).await;
    let bad = fleetcast(&["approve", "shapp", "--where", "web"], &url).await;
    assert!(!bad.status.success(), "a selector without = is refused");
    assert!(
        text(&bad.stderr).contains("key=value"),
        "{}",
        text(&bad.stderr)
    );
    let out = fleetcast(&["approve", "shapp", "2.0.0", "--where", "role=web"], &url).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("approved for the hosts where role=web"),
        "{}",
        text(&out.stdout)
    );
    // The history says who approved it, and for which hosts.
    let actions = p
        .tracker_command(&Command::History(HistoryQuery {
            app: Some(AppName::from_static("shapp")),
            kind: Some(HistoryKind::OperatorAction),
            version: Some("2.0.0".parse().expect("version")),
            ..Default::default()
        }))
        .await
        .expect("history");
    let approved: Vec<Option<String>> = actions
        .history
        .iter()
        .filter(|e| !e.refused)
        .map(|e| e.target.as_ref().map(ToString::to_string))
        .collect();
    assert_eq!(approved, vec![Some("role=web".to_string())]);
    let done = rollout_phase(&p, Phase::Completed).await;
    assert_eq!(
        done.target.map(|t| t.to_string()).as_deref(),
        Some("role=web")
    );
    assert_eq!(
        (done.rings[0].targets, done.rings[0].done),
        (2, 2),
        "the rollout's hosts are the two web hosts"
    );
    for id in ["w1", "w2"] {
        eventually(&format!("{id} runs 2.0.0"), || {
            running(&state(id)) == "2.0.0"
        })
        .await;
    }
    // d1 keeps 1.0.0 and says why, and is nobody's laggard.
    until(
        Duration::from_millis(200),
        "d1 saying why it does not switch",
        async || p.tracker_command(&Command::Status).await.ok(),
        |reply| {
            reply.iter().flat_map(|r| &r.agents).any(|a| {
                a.agent_id.as_str() == "d1"
                    && a.apps.get("shapp").is_some_and(|app| {
                        app.waiting
                            .as_deref()
                            .is_some_and(|w| w.contains("for the hosts where role=web"))
                    })
            })
        },
    )
    .await;
    assert_eq!(running(&state("d1")), "1.0.0", "a db host never switched");
    let laggards = p
        .tracker_command(&Command::Laggards {
            app: Some(AppName::from_static("shapp")),
        })
        .await
        .expect("laggards");
    assert!(laggards.laggards.is_empty(), "{:?}", laggards.laggards);

    // Listing by labels: the CLI and the API pick the same host, and refuse a non-selector.
    let listed = fleetcast(&["agents", "--where", "role!=web"], &url).await;
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let listed = text(&listed.stdout);
    assert!(
        listed.contains("d1") && listed.contains("role=db"),
        "{listed}"
    );
    assert!(!listed.contains("w1") && !listed.contains("w2"), "{listed}");
    let picked: Vec<AgentSummary> =
        serde_json::from_str(&http_get(port, "/api/agents?where=role%21%3Dweb")).expect("json");
    let ids: Vec<&str> = picked.iter().map(|a| a.agent_id.as_str()).collect();
    assert_eq!(ids, vec!["d1"]);
    let (status, body) = http_request(port, "GET", "/api/agents?where=nonsense", &[], "");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("key=value"), "{body}");

    // The dashboard, as a person sees it: the rollout says whose it is, and the agents box
    // narrows the list (and says why it will not for a text that is not a selector).
    let mut page = Browser::open(&format!("http://127.0.0.1:{port}/"))
        .await
        .expect("browser");
    let card = page
        .wait_for(
            "the rollout's target on its card",
            "document.querySelector('.rollout[data-app=shapp] .target')?.textContent",
        )
        .await
        .expect("card");
    assert_eq!(card, " for the hosts where role=web");
    page.type_into("#agents-where", "role!=web")
        .await
        .expect("type");
    page.eval("document.getElementById('agent-filter').requestSubmit()")
        .await
        .expect("submit");
    agents_listed(&mut page, "d1").await;
    page.eval("document.getElementById('agents-where').value = 'nonsense'; document.getElementById('agent-filter').requestSubmit()")
        .await
        .expect("submit");
    let why = page
        .wait_for(
            "the refusal beside the box",
            "document.getElementById('agents-where-error').textContent",
        )
        .await
        .expect("refusal");
    assert!(
        why.as_str().is_some_and(|w| w.contains("key=value")),
        "{why}"
    );
    // Refused, the box narrows nothing: the whole list again.
    agents_listed(&mut page, "d1 w1 w2").await;
}

/// Waits until the dashboard's agents table lists exactly the agents `want` (ids, in order).
async fn agents_listed(page: &mut Browser, want: &str) {
    page.wait_for(
        &format!("the agents listed being {want}"),
        &format!(
            "[...document.querySelectorAll('#agents tr.agent')].map(r => r.dataset.agent).join(' ') === {want:?}"
        ),
    )
    .await
    .expect("agents listed");
}
