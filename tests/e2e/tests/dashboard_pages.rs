//! The dashboard's pages a person reads at a glance (history, releases, a rollout's timeline),
//! in headless Chromium against a real tracker on a real nats-server, in the three states that
//! matter: nothing released yet (the pages say so), a halted rollout (its halt is marked on
//! the timeline and in the history, with its reason), and a tracker cut off from NATS (every
//! page says so). Each state is also screenshotted (kept under
//! `target/tmp/dashboard-screenshots/`) and the screenshot checked: not blank, the banner's or
//! the halt mark's colour where it must be, and nowhere else.

use fleetcast_events::AppName;
use std::time::Duration;

use fleetcast_e2e::browser::{Screenshot, page_dom};
use fleetcast_e2e::checks::{auto_approved, release_until, until};
use fleetcast_e2e::{Pipeline, fleet_in, http_get, ring, script_app};
use fleetcast_events::tracker::Phase;
use fleetcast_tracker::policy::AppPolicy;
use serde_json::Value;

/// The banner's background (`#fee2e2`, used by the banner alone).
const BANNER: [u8; 3] = [0xfe, 0xe2, 0xe2];
/// A halt's mark on the timeline (`#b91c1c`).
const HALT: [u8; 3] = [0xb9, 0x1c, 0x1c];
/// The background of an entry that says something went wrong (`#fff7ed`).
const ALARM_ROW: [u8; 3] = [0xff, 0xf7, 0xed];

fn policy() -> AppPolicy {
    auto_approved(vec![ring("canary", 1, 1), ring("broad", 2, 1)])
}

/// A pipeline, a tracker with [`policy`] for `shapp`, and `agents`: the hosts and the
/// tracker's HTTP port.
async fn start(agents: &[(&str, &str)]) -> (Pipeline, tempfile::TempDir, u16) {
    let mut p = Pipeline::start().await.expect("pipeline");
    let settings = p.tracker_settings();
    let (hosts, port) = fleet_in(&mut p, settings, policy(), agents).await;
    (p, hosts, port)
}

/// A screenshot of page `path`, kept as `target/tmp/dashboard-screenshots/<name>.png`.
async fn screenshot(port: u16, path: &str, name: &str) -> Screenshot {
    let file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("dashboard-screenshots")
        .join(format!("{name}.png"));
    fleetcast_e2e::browser::page_screenshot(port, path, &file).await
}

/// `shot` has more than `pixels` pixels of `colour`, the colour of `what`.
fn assert_more_than(shot: &Screenshot, colour: [u8; 3], pixels: usize, what: &str) {
    let count = shot.count(colour);
    assert!(
        count > pixels,
        "{}: {what} is missing ({count} pixels of its colour)",
        shot.file.display()
    );
}

fn json(port: u16, path: &str) -> Value {
    let body = http_get(port, path);
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// The table row of `dom` whose opening tag contains `attr` (up to its `</tr>`).
fn row<'a>(dom: &'a str, attr: &str) -> &'a str {
    let start = dom
        .find(attr)
        .unwrap_or_else(|| panic!("no row with {attr}: {dom}"));
    let end = dom[start..].find("</tr>").map_or(dom.len(), |e| start + e);
    &dom[start..end]
}

/// Waits until `check` holds of the JSON at `path`, and returns it.
async fn json_when(port: u16, path: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    until(
        Duration::from_millis(200),
        what,
        async || json(port, path),
        check,
    )
    .await
}

fn kinds(entries: &Value) -> Vec<&str> {
    entries
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["kind"].as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nothing_released_the_pages_say_so() {
    let (_p, _hosts, port) = start(&[]).await;

    for (path, empty) in [
        ("/history", "nothing recorded yet"),
        ("/releases", "no releases yet"),
        ("/rollout", "no rollouts yet"),
        ("/rollout?app=shapp", "no rollout of shapp yet"),
    ] {
        let dom = page_dom(port, path).await;
        assert!(
            dom.contains("data-loaded=\"true\""),
            "{path} never loaded: {dom}"
        );
        assert!(dom.contains("data-connected=\"true\""), "{path}: {dom}");
        assert!(dom.contains(empty), "{path} does not say {empty:?}: {dom}");
        assert!(!dom.contains("<table"), "{path}: an empty table: {dom}");
        // Every page links to the others.
        assert!(
            dom.contains("<a href=\"history\"") && dom.contains("<a href=\"releases\""),
            "{path}: no links: {dom}"
        );
    }
    // The main page links to them too.
    assert!(
        fleetcast_e2e::dashboard_dom(port)
            .await
            .contains("<a href=\"releases\">")
    );

    let shot = screenshot(port, "/releases", "empty-releases").await;
    assert!(shot.ink() > 500, "{} looks blank", shot.file.display());
    assert_eq!(shot.count(BANNER), 0, "{}: a banner", shot.file.display());

    // The shared files are served from the binary; nothing else is.
    assert!(http_get(port, "/assets/uPlot.iife.min.js").contains("uPlot"));
    assert!(http_get(port, "/assets/common.js").contains("window.fleetcast"));
    assert_eq!(json(port, "/api/releases"), serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halted_rollout_is_marked_on_its_timeline_and_in_the_history() {
    let (mut p, _hosts, port) = start(&[("c1", "canary"), ("b1", "broad")]).await;
    release_until(&p, "1.0.0", true, Phase::Completed).await;
    release_until(&p, "2.0.0", false, Phase::Halted).await;

    // The timeline's data: its samples (a failed host among them) and its marks, from the
    // history (recorded just after the halt).
    let timeline = json_when(
        port,
        "/api/rollouts/shapp/timeline",
        "the halt's mark",
        |v| kinds(&v["marks"]).contains(&"rollout.halted"),
    )
    .await;
    assert_eq!(timeline["rollout"]["version"], "2.0.0", "{timeline}");
    assert_eq!(
        kinds(&timeline["marks"]),
        ["rollout.started", "ring.started", "rollout.halted"],
        "this rollout's marks only: {timeline}"
    );
    let halt = &timeline["marks"][2];
    assert_eq!(halt["ring"], "canary", "{halt}");
    assert!(
        halt["reason"]
            .as_str()
            .is_some_and(|r| r.contains("ring canary: 1 of 1 hosts failed")),
        "{halt}"
    );
    let samples = timeline["samples"].as_array().expect("samples").clone();
    assert!(
        samples.iter().any(|s| s["failed"] == 1),
        "the failure is on the timeline: {samples:?}"
    );
    // The views the dashboard polls do not carry the timeline.
    assert!(!http_get(port, "/api/rollouts").contains("\"timeline\""));

    // The rollout page: the plot, the halt among its marks, with its reason.
    let dom = page_dom(port, "/rollout?app=shapp").await;
    assert!(dom.contains("Rollout of shapp 2.0.0"), "{dom}");
    assert!(dom.contains("<canvas"), "no plot: {dom}");
    assert!(
        dom.contains(&format!("data-samples=\"{}\"", samples.len())),
        "{dom}"
    );
    let mark = row(
        &dom,
        "<li class=\"mark alarm\" data-kind=\"rollout.halted\"",
    );
    assert!(mark.contains("HALTED in canary"), "{mark}");
    assert!(mark.contains("ring canary: 1 of 1 hosts failed"), "{mark}");
    let shot = screenshot(port, "/rollout?app=shapp", "halted-rollout").await;
    // The halt's bar spans the plot's height (a few hundred pixels, a few wide).
    assert_more_than(&shot, HALT, 500, "the halt's mark");
    assert_eq!(shot.count(BANNER), 0, "{}", shot.file.display());

    // The history page: the halt, marked, with its reason; the canary's rollback too.
    let dom = page_dom(port, "/history").await;
    let halted = row(
        &dom,
        "<tr class=\"alarm entry\" data-kind=\"rollout.halted\"",
    );
    assert!(halted.contains(">halted</span>"), "no badge: {halted}");
    assert!(
        halted.contains("ring canary: 1 of 1 hosts failed"),
        "{halted}"
    );
    let rolled_back = row(&dom, "data-kind=\"host.rolled_back\"");
    assert!(rolled_back.contains("c1"), "{rolled_back}");
    assert!(dom.contains("data-kind=\"release.stored\""), "{dom}");
    let shot = screenshot(port, "/history", "halted-history").await;
    assert!(shot.count(ALARM_ROW) > 0, "{}", shot.file.display());

    // Filtered through the URL: only halts; a kind that does not exist is the API's answer.
    let dom = page_dom(port, "/history?kind=rollout.halted").await;
    assert!(dom.contains("data-kind=\"rollout.halted\""), "{dom}");
    assert!(
        !dom.contains("data-kind=\"release.stored\""),
        "not filtered: {dom}"
    );
    let dom = page_dom(port, "/history?app=shapp&kind=rollout.exploded").await;
    assert!(
        dom.contains("<div class=\"error\">") && dom.contains("`rollout.exploded`"),
        "the API's refusal is shown: {dom}"
    );
    let dom = page_dom(port, "/history?app=otherapp").await;
    assert!(
        dom.contains("nothing recorded matches these filters"),
        "{dom}"
    );

    // An older version dropped after: the signer refuses it, and the releases page says why.
    script_app("1.5.0", true)
        .write_to(&p.drop_dir().join("shapp-1.5.0.zip"))
        .expect("drop");
    json_when(port, "/api/releases?app=shapp", "1.5.0's rejection", |v| {
        v[0]["releases"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["version"] == "1.5.0" && r["state"] == "rejected")
    })
    .await;

    // The releases page: both versions stored, each with the hosts that run it (the canary
    // went back to 1.0.0), the refused one marked with its reason.
    let dom = page_dom(port, "/releases").await;
    let refused = row(&dom, "<tr class=\"alarm release\" data-version=\"1.5.0\"");
    assert!(
        refused.contains(">rejected</span>") && refused.contains("version_not_newer: "),
        "{refused}"
    );
    screenshot(port, "/releases", "halted-releases").await;
    let v1 = row(&dom, "data-version=\"1.0.0\"");
    assert!(
        v1.contains("stored") && v1.contains("c1") && v1.contains("b1"),
        "{v1}"
    );
    let v2 = row(&dom, "data-version=\"2.0.0\"");
    assert!(v2.contains("stored") && !v2.contains("c1"), "{v2}");
    assert!(dom.contains("href=\"rollout?app=shapp\""), "{dom}");

    // A restarted tracker keeps the timeline (it is saved with the rollout).
    p.stop("tracker").await;
    let mut settings = p.tracker_settings();
    settings.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    settings
        .apps
        .insert(AppName::from_static("shapp"), policy());
    p.start_tracker_with(settings);
    fleetcast_e2e::eventually("the tracker listens again", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let after = json(port, "/api/rollouts/shapp/timeline");
    assert_eq!(after["samples"].as_array(), Some(&samples), "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_says_when_the_tracker_is_cut_off_from_nats() {
    let (mut p, _hosts, port) = start(&[("c1", "canary")]).await;
    release_until(&p, "1.0.0", true, Phase::Completed).await;
    let live = screenshot(port, "/history", "connected-history").await;
    assert_eq!(
        live.count(BANNER),
        0,
        "{}: a banner while connected",
        live.file.display()
    );

    p.nats.stop();
    fleetcast_e2e::eventually("the tracker reports it is cut off", || {
        http_get(port, "/health").trim() != "ok"
    })
    .await;
    for path in ["/history", "/releases", "/rollout", "/rollout?app=shapp"] {
        let dom = page_dom(port, path).await;
        assert!(dom.contains("data-connected=\"false\""), "{path}: {dom}");
        assert!(
            dom.contains("class=\"shown\">The tracker is cut off from NATS"),
            "{path}: no banner: {dom}"
        );
    }
    // The rollout page still shows what the tracker holds, and why its marks are missing.
    let dom = page_dom(port, "/rollout?app=shapp").await;
    assert!(dom.contains("<canvas"), "{dom}");
    assert!(dom.contains("the history cannot be read"), "{dom}");

    let shot = screenshot(port, "/history", "disconnected-history").await;
    // The banner is a wide band across the top of the page.
    assert_more_than(&shot, BANNER, 5_000, "the banner");
}

/// Under its own NATS identity (`ops/nats/gen-accounts`), the tracker may list the release
/// records the releases page shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tracker_lists_the_releases_under_its_own_identity() {
    let mut p = Pipeline::new_with_permissions(&[]).await.expect("pipeline");
    p.start_pipeline_as_roles();
    let port = fleetcast_e2e::free_addr().port();
    let mut settings = p.tracker_settings();
    settings.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    p.start_tracker_as_role(settings);
    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    fleetcast_e2e::eventually("the tracker listens", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    // Refused, the listing would be a 503 with NATS's reason, not JSON.
    let apps = json(port, "/api/releases?app=shapp");
    assert_eq!(apps[0]["app"], "shapp", "{apps}");
    assert_eq!(apps[0]["releases"][0]["version"], "1.0.0", "{apps}");
    assert_eq!(apps[0]["releases"][0]["state"], "stored", "{apps}");
    assert_eq!(apps[0]["releases"][0]["stored"]["files"], 2, "{apps}");
}
