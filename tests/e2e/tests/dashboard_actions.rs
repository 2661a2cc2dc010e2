//! Actions through the tracker's HTTP API and its dashboard, behind bearer tokens: an operator's
//! token acts, and the history records it once as `http:<name>`; a read token is refused (403)
//! and recorded as refused; no token (401) and a form's content type (415) do nothing. In
//! headless Chromium, a person signed in with an operator's token approves a rollout and rolls
//! back from the page, each after a confirmation naming the app, version and release; signed
//! in with a read token the page shows the refusal; without a token it offers no way to act.

use fleetcast_events::{AppName, RingName};
use std::time::Duration;

use fleetcast_e2e::browser::Browser;
use fleetcast_e2e::checks::{poll, until};
use fleetcast_e2e::{Pipeline, TIMEOUT, http_get, http_request, script_app};
use fleetcast_events::tracker::Phase;
use fleetcast_events::tracker::RolloutSummary;
use fleetcast_events::v1::{HistoryEntry, HistoryKind};
use fleetcast_tracker::auth::{HttpSettings, TokenEntry, TokenHash, TokenName, TokenRole};
use fleetcast_tracker::policy::{AppPolicy, Approval, RingPolicy};

/// The operator's and the reader's tokens.
struct Tokens {
    operator: String,
    read: String,
}

fn token_entry(name: &str, role: TokenRole, token: &str) -> TokenEntry {
    TokenEntry {
        name: TokenName::try_from(name.to_string()).expect("name"),
        role,
        hash: TokenHash::try_from(fleetcast_events::tracker::token_hash(token).as_str())
            .expect("hash"),
    }
}

/// A tracker for `p` on a port of its own, `shapp` released under manual approval (one ring),
/// with an operator token `alice` and a read token `rita`. Returns its port.
fn start_tracker(p: &mut Pipeline, as_role: bool) -> (u16, Tokens) {
    let tokens = Tokens {
        operator: fleetcast_events::tracker::new_token().expect("token"),
        read: fleetcast_events::tracker::new_token().expect("token"),
    };
    let mut settings = p.tracker_settings();
    let port = fleetcast_e2e::free_addr().port();
    settings.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    settings.http = HttpSettings {
        read_requires_token: false,
        tokens: vec![
            token_entry("alice", TokenRole::Operator, &tokens.operator),
            token_entry("rita", TokenRole::Read, &tokens.read),
        ],
    };
    settings.apps.insert(
        AppName::from_static("shapp"),
        AppPolicy {
            approval: Approval::Manual,
            rings: vec![RingPolicy {
                name: RingName::from_static("canary"),
                ..AppPolicy::default().rings.remove(0)
            }],
        },
    );
    if as_role {
        p.start_tracker_as_role(settings);
    } else {
        p.start_tracker_with(settings);
    }
    (port, tokens)
}

fn rollout(port: u16) -> Option<RolloutSummary> {
    let body = http_get(port, "/api/rollouts?app=shapp");
    let views: Vec<RolloutSummary> = serde_json::from_str(&body).ok()?;
    views.into_iter().next()
}

/// Waits until shapp's rollout is `version` in `phase`.
async fn rollout_reaches(port: u16, version: &str, phase: Phase) -> RolloutSummary {
    poll(Duration::from_millis(100), async || match rollout(port) {
        Some(view) if view.version.to_string() == version && view.phase == phase => Ok(view),
        other => Err(format!(
            "shapp {version} never reached {phase:?}: {:?}",
            other.map(|v| (v.version, v.phase))
        )),
    })
    .await
}

/// Drops `shapp` `version` and waits until its rollout waits for approval.
async fn awaiting_approval(p: &Pipeline, port: u16, version: &str) {
    p.release("shapp", version, &script_app(version, true))
        .await;
    rollout_reaches(port, version, Phase::AwaitingApproval).await;
}

fn actions(port: u16, actor: &str) -> Vec<HistoryEntry> {
    let body = http_get(
        port,
        &format!("/api/history?app=shapp&kind=operator.action&actor={actor}"),
    );
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("history: {e}: {body}"))
}

/// Waits until the history holds `n` operator actions of `actor`, and returns them.
async fn actions_reach(port: u16, actor: &str, n: usize) -> Vec<HistoryEntry> {
    until(
        Duration::from_millis(100),
        &format!("{n} actions of {actor}"),
        async || actions(port, actor),
        |found| found.len() >= n,
    )
    .await
}

fn post(
    port: u16,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: &str,
) -> (u16, String) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", content_type)];
    if let Some(b) = &bearer {
        headers.push(("Authorization", b.as_str()));
    }
    http_request(port, "POST", path, &headers, body)
}

const JSON: &str = "application/json";

/// `POST body` (JSON) to `path` with the operator's token: the status and the body.
fn operator_posts(port: u16, tokens: &Tokens, path: &str, body: &str) -> (u16, String) {
    post(port, path, Some(&tokens.operator), JSON, body)
}

/// Waits until the tracker rolls back to `to` (a rollout carrying the signer's directive).
async fn rollback_started(port: u16, to: &str) {
    let back = tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Some(v) = rollout(port).filter(|v| v.rollback) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the rollback never started");
    assert_eq!(back.version.to_string(), to);
}

/// A script true once the button `selector` is on the page and enabled.
fn enabled(selector: &str) -> String {
    format!(
        "document.querySelector({selector:?}) && !document.querySelector({selector:?}).disabled"
    )
}

/// Signs in on `page` with `token`, and waits until `ready` (a script) holds.
async fn sign_in(page: &mut Browser, token: &str, what: &str, ready: &str) {
    page.type_into("#token", token).await.expect("type");
    page.click("#sign-in").await.expect("sign in");
    page.wait_for(what, ready).await.expect("signed in");
}

/// Clicks `button` on `page` and waits until the confirmation dialog is open and `ready` (a
/// script) holds.
async fn ask_confirmation(page: &mut Browser, button: &str, what: &str, ready: &str) {
    page.click(button).await.expect("click");
    page.wait_for(
        what,
        &format!("document.getElementById('confirm').open && {ready}"),
    )
    .await
    .expect("dialog");
}

/// Confirms in the open dialog on `page`: what `answer` (a script) is once it holds, the
/// tracker's answer shown on the page.
async fn confirm(page: &mut Browser, what: &str, answer: &str) -> serde_json::Value {
    page.click("#confirm-ok").await.expect("confirm");
    page.wait_for(what, answer).await.expect("answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_actions_need_an_operators_token_and_each_is_recorded_with_its_name() {
    // Every service, the tracker included, with its own NATS identity: the tracker's may ask
    // for a rollback on its own subject and list the releases it goes back to.
    let mut p = Pipeline::new_with_permissions(&[]).await.expect("pipeline");
    p.start_pipeline_as_roles();
    let (port, tokens) = start_tracker(&mut p, true);
    awaiting_approval(&p, port, "1.0.0").await;
    let approve = "/api/apps/shapp/approve";
    let rollback = "/api/apps/shapp/rollback";

    // No token, an unknown one, another scheme: 401, nothing done or recorded.
    for auth in [None, Some("not-a-token")] {
        let (status, body) = post(port, approve, auth, JSON, "{}");
        assert_eq!(status, 401, "{body}");
    }
    let (status, _) = http_request(
        port,
        "POST",
        approve,
        &[
            ("Content-Type", JSON),
            ("Authorization", "Basic YWxpY2U6eA=="),
        ],
        "{}",
    );
    assert_eq!(status, 401);
    // A form (what another site could make a browser send): 415, nothing done.
    let (status, body) = post(
        port,
        approve,
        Some(&tokens.operator),
        "application/x-www-form-urlencoded",
        "version=1.0.0",
    );
    assert_eq!(status, 415, "{body}");
    // A path that names no app: 404, nothing done.
    let (status, body) = operator_posts(port, &tokens, "/api/apps/Bad_App/approve", "{}");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("app name"), "{body}");
    // A read token: 403, recorded as refused.
    let (status, body) = post(port, approve, Some(&tokens.read), JSON, "{}");
    assert_eq!(status, 403, "{body}");
    let refused = actions_reach(port, "http:rita", 1).await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].refused, "{refused:?}");
    assert_eq!(refused[0].action.as_deref(), Some("approve"));
    assert!(
        refused[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("may only read")),
        "{refused:?}"
    );
    // None of that moved the rollout.
    rollout_reaches(port, "1.0.0", Phase::AwaitingApproval).await;
    assert!(actions(port, "http:alice").is_empty());

    // The operator: done, 200, recorded once as http:alice.
    let (status, body) = operator_posts(port, &tokens, approve, r#"{"version":"1.0.0"}"#);
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(answer["ok"], true, "{body}");
    assert!(rollout(port).is_some_and(|v| v.phase != Phase::AwaitingApproval));
    let done = actions_reach(port, "http:alice", 1).await;
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(done[0].action.as_deref(), Some("approve"));
    assert_eq!(
        done[0].version.as_ref().map(|v| v.to_string()).as_deref(),
        Some("1.0.0")
    );
    assert!(!done[0].refused, "{done:?}");
    assert_eq!(done[0].kind, HistoryKind::OperatorAction);

    // What the tracker refuses (approving a version it is not rolling out) is a 409,
    // recorded as refused.
    let (status, body) = operator_posts(port, &tokens, approve, r#"{"version":"9.9.9"}"#);
    assert_eq!(status, 409, "{body}");
    let both = actions_reach(port, "http:alice", 2).await;
    assert!(both[1].refused, "{both:?}");

    // A rollback over HTTP: asked by the tracker on its own subject, signed, rolled out.
    awaiting_approval(&p, port, "2.0.0").await;
    let (status, body) = operator_posts(port, &tokens, rollback, r#"{"to":"1.0.0"}"#);
    assert_eq!(status, 200, "{body}");
    rollback_started(port, "1.0.0").await;
    let all = actions_reach(port, "http:alice", 3).await;
    assert_eq!(all[2].action.as_deref(), Some("rollback"));
    assert!(!all[2].refused, "{all:?}");
    // The pipeline's record of the request names who published it: the tracker.
    let asked = tokio::time::timeout(TIMEOUT, async {
        loop {
            let body = http_get(port, "/api/history?app=shapp&kind=rollback.requested");
            let asked: Vec<HistoryEntry> = serde_json::from_str(&body).unwrap_or_default();
            if !asked.is_empty() {
                return asked;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the rollback request never reached the history");
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].actor.as_deref(), Some("tracker"));
    // A version that is not stored: refused by the tracker, nothing asked.
    let (status, body) = operator_posts(port, &tokens, rollback, r#"{"to":"0.9.0"}"#);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("not a stored release"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_can_need_a_token_while_health_and_metrics_stay_open() {
    let mut p = Pipeline::start().await.expect("pipeline");
    let token = fleetcast_events::tracker::new_token().expect("token");
    let mut settings = p.tracker_settings();
    let port = fleetcast_e2e::free_addr().port();
    settings.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    settings.http = HttpSettings {
        read_requires_token: true,
        tokens: vec![token_entry("rita", TokenRole::Read, &token)],
    };
    p.start_tracker_with(settings);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        || http_request(port, "GET", "/health", &[], "").0 != 200
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "tracker never healthy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(http_request(port, "GET", "/api/rollouts", &[], "").0, 401);
    assert_eq!(http_request(port, "GET", "/api/history", &[], "").0, 401);
    let bearer = format!("Bearer {token}");
    let (status, body) = http_request(
        port,
        "GET",
        "/api/rollouts",
        &[("Authorization", &bearer)],
        "",
    );
    assert_eq!((status, body.as_str()), (200, "[]"));
    assert_eq!(http_request(port, "GET", "/metrics", &[], "").0, 200);
    // The page itself holds no data: served to anyone, its script sends the token.
    assert_eq!(http_request(port, "GET", "/", &[], "").0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_the_page_an_operator_approves_and_rolls_back_a_reader_is_refused_and_without_a_token_nothing_is_possible()
 {
    let mut p = Pipeline::start().await.expect("pipeline");
    let (port, tokens) = start_tracker(&mut p, false);
    awaiting_approval(&p, port, "1.0.0").await;

    let mut page = Browser::open(&format!("http://127.0.0.1:{port}/"))
        .await
        .expect("chromium");
    let approve = r#".rollout[data-app="shapp"] button[data-action="approve"]"#;
    page.wait_for(
        "the rollout and its approve button",
        &format!("!!document.querySelector({approve:?})"),
    )
    .await
    .expect("page");

    // Signed out: the button is there, disabled, with the reason; a click does nothing.
    let disabled = page
        .eval(&format!("document.querySelector({approve:?}).disabled"))
        .await
        .expect("eval");
    assert_eq!(disabled, true);
    let dom = page.dom().await.expect("dom");
    assert!(
        dom.contains("sign in with an operator's token to act"),
        "{dom}"
    );
    page.click(approve).await.expect("click");
    let opened = page
        .eval("document.getElementById('confirm').open")
        .await
        .expect("eval");
    assert_eq!(opened, false, "a disabled button opened the dialog");
    // Nor can the page's own script act without one.
    let status = page
        .eval(
            "fetch('api/apps/shapp/approve', { method: 'POST', \
             headers: { 'Content-Type': 'application/json' }, body: '{}' }).then(r => r.status)",
        )
        .await
        .expect("fetch");
    assert_eq!(status, 401);
    assert_eq!(
        rollout(port).map(|v| v.phase),
        Some(Phase::AwaitingApproval)
    );

    // Signed in with the operator's token: kept in the tab's session storage, never a cookie.
    sign_in(
        &mut page,
        &tokens.operator,
        "the approve button enabled",
        &enabled(approve),
    )
    .await;
    let kept = page
        .eval("[sessionStorage.getItem('fleetcast.token'), document.cookie]")
        .await
        .expect("eval");
    assert_eq!(kept, serde_json::json!([tokens.operator, ""]));

    // Approve asks first, naming the app, version and action, with the release's summary.
    ask_confirmation(
        &mut page,
        approve,
        "the confirmation with the release",
        "document.querySelector('#confirm-release .release')",
    )
    .await;
    let title = page
        .eval("document.getElementById('confirm-title').textContent")
        .await
        .expect("title");
    assert_eq!(title, "Approve shapp 1.0.0?");
    let release = page
        .eval("document.getElementById('confirm-release').textContent")
        .await
        .expect("release");
    assert!(
        release
            .as_str()
            .is_some_and(|r| r.starts_with("shapp 1.0.0: stored")),
        "{release}"
    );
    let shown = confirm(
        &mut page,
        "the tracker's answer on the page",
        "document.getElementById('action-result').textContent",
    )
    .await;
    assert_eq!(shown, "shapp 1.0.0 approved");

    // The rollout moved on, and the history says who approved it.
    assert!(rollout(port).is_some_and(|v| v.phase != Phase::AwaitingApproval));
    let done = actions_reach(port, "http:alice", 1).await;
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(done[0].action.as_deref(), Some("approve"));
    assert!(!done[0].refused);

    // Signed in with a read token, the tracker's refusal is what the page shows.
    awaiting_approval(&p, port, "2.0.0").await;
    page.click("#sign-out").await.expect("sign out");
    sign_in(
        &mut page,
        &tokens.read,
        "2.0.0 to approve",
        &format!(
            "document.querySelector('.rollout[data-app=shapp] b').textContent.includes('2.0.0') \
             && {}",
            enabled(approve)
        ),
    )
    .await;
    ask_confirmation(
        &mut page,
        approve,
        "the confirmation with the release",
        "!document.getElementById('confirm-ok').disabled",
    )
    .await;
    let shown = confirm(
        &mut page,
        "the refusal on the page",
        "document.getElementById('action-result').textContent.includes('rita') \
         && document.getElementById('action-result').textContent",
    )
    .await;
    assert_eq!(shown, "refused: token rita may only read");
    assert_eq!(
        rollout(port).map(|v| v.phase),
        Some(Phase::AwaitingApproval)
    );

    // An operator rolls back from the page, to the earlier stored release it offers.
    page.click("#sign-out").await.expect("sign out");
    let rollback = r#".rollout[data-app="shapp"] button[data-action="rollback"]"#;
    sign_in(
        &mut page,
        &tokens.operator,
        "the rollback button enabled",
        &enabled(rollback),
    )
    .await;
    ask_confirmation(
        &mut page,
        rollback,
        "the rollback's confirmation",
        "document.getElementById('rollback-to')",
    )
    .await;
    let asked = page
        .eval("[document.getElementById('confirm-title').textContent, document.getElementById('confirm-release').textContent]")
        .await
        .expect("eval");
    assert_eq!(asked[0], "Roll back shapp from 2.0.0 to 1.0.0?");
    assert!(
        asked[1]
            .as_str()
            .is_some_and(|r| r.starts_with("shapp 1.0.0: stored")),
        "{asked}"
    );
    let shown = confirm(
        &mut page,
        "the rollback's answer",
        "document.getElementById('action-result').textContent.startsWith('rollback') \
         && document.getElementById('action-result').textContent",
    )
    .await;
    assert_eq!(
        shown,
        "rollback of shapp to 1.0.0 (replacing up to 2.0.0) requested"
    );
    rollback_started(port, "1.0.0").await;
}
