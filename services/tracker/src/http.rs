//! HTTP: the dashboard (`/`), the JSON API (`/api/agents`: the inventory, stale ones marked;
//! `/api/rollouts`: each app's rollout with its progress per ring; both filter with `?app=`,
//! `?ring=`; `/api/history`: what fleetcast did and who asked; `/api/apps/{app}/releases`: an
//! app's releases, what a rollback can go back to), the actions (`POST /api/apps/{app}/approve`,
//! `pause`, `resume`, `abort`, `rollback`, behind a bearer token, see [`crate::auth`]), the other pages and their API
//! ([`crate::pages`]: `/history`, `/releases`, `/rollout`), Prometheus `/metrics`, `/health` (both as every service serves them, from
//! `fleetcast_runtime::observe`, with the tracker's own gauges added to `/metrics`).
//!
//! Why actions are safe from cross-site requests: a token is only ever taken from the
//! `Authorization: Bearer` header, never from a cookie, so a page on another site cannot make
//! a browser send one; and an action must say `Content-Type: application/json`, which a form
//! cannot send and a script on another origin cannot send without a CORS preflight this
//! server never grants. Anything else is refused (415) before it is read.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fleetcast_runtime::observe;
use serde::{Deserialize, Serialize};

use crate::auth::{TokenEntry, TokenRole};
use crate::service::Tracker;
use fleetcast_events::tracker::{
    AgentSummary, Command, HistoryQuery, ReleaseSummary, RolloutSummary,
};
use fleetcast_events::{AppName, RingName};

/// An action's body is a few fields: anything larger is refused unread.
const ACTION_BODY_LIMIT: usize = 4 * 1024;

pub fn router(tracker: Arc<Tracker>) -> Router {
    routes()
        // Around every route: any read under /api/ needs a token when reads do.
        .layer(middleware::from_fn_with_state(
            tracker.clone(),
            reads_need_token,
        ))
        .layer(DefaultBodyLimit::max(ACTION_BODY_LIMIT))
        .with_state(tracker)
}

/// Every page and endpoint (add new ones here: [`router`] puts its guards around them all).
fn routes() -> Router<Arc<Tracker>> {
    let mut router = Router::new()
        .route("/", get(|| async { Html(include_str!("dashboard.html")) }))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/agents", get(agents))
        .route("/api/rollouts", get(rollouts))
        .route("/api/laggards", get(laggards))
        .route("/api/history", get(history))
        .route("/api/apps/{app}/releases", get(app_releases))
        .merge(crate::pages::router());
    for action in Action::ALL {
        let path = format!("/api/apps/{{app}}/{}", action.name());
        router = router.route(
            &path,
            post(move |state, app, headers, body| act(action, state, app, headers, body)),
        );
    }
    router
}

/// `?app=` and `?ring=` narrow a listing (`/api/agents` also takes `?where=role=web`).
#[derive(Debug, Default, Deserialize)]
struct Filter {
    app: Option<String>,
    ring: Option<String>,
}

/// `?where=`: the agents whose labels match (a bad selector is refused as the query is read).
#[derive(Debug, Default, Deserialize)]
struct Labelled {
    #[serde(rename = "where")]
    selector: Option<fleetcast_events::Selector>,
}

async fn agents(
    State(tracker): State<Arc<Tracker>>,
    Query(filter): Query<Filter>,
    Query(labelled): Query<Labelled>,
) -> Json<Vec<AgentSummary>> {
    let mut rows = tracker.agents().await;
    rows.retain(|row| {
        filter.ring.as_ref().is_none_or(|r| row.ring == *r)
            && filter
                .app
                .as_ref()
                .is_none_or(|a| row.apps.contains_key(a.as_str()))
            && labelled
                .selector
                .as_ref()
                .is_none_or(|s| s.matches(&row.labels))
    });
    Json(rows)
}

async fn laggards(
    State(tracker): State<Arc<Tracker>>,
    Query(filter): Query<Filter>,
) -> Json<Vec<crate::laggards::Laggard>> {
    let mut laggards = tracker.laggards(filter.app.as_deref()).await;
    laggards.retain(|l| filter.ring.as_ref().is_none_or(|r| l.ring == *r));
    Json(laggards)
}

async fn rollouts(
    State(tracker): State<Arc<Tracker>>,
    Query(filter): Query<Filter>,
) -> Json<Vec<RolloutSummary>> {
    let mut views = tracker.rollouts().await;
    views.retain(|v| filter.app.as_ref().is_none_or(|a| v.app == *a));
    if let Some(ring) = &filter.ring {
        for v in &mut views {
            v.rings.retain(|r| r.ring == *ring);
        }
    }
    Json(views)
}

/// The history (`?app=`, `?kind=`, `?version=`, `?actor=`, `?limit=`), oldest first; 400 for a
/// bad app name (refused as the query is read), 503 when it cannot be read (NATS unreachable).
async fn history(
    State(tracker): State<Arc<Tracker>>,
    Query(query): Query<HistoryQuery>,
) -> axum::response::Response {
    match tracker.history.list(&query).await {
        Ok(entries) => Json(entries).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

/// 503 while the tracker is cut off from NATS: it then neither hears agents nor moves rollouts.
async fn health(State(tracker): State<Arc<Tracker>>) -> impl IntoResponse {
    observe::health_response(Some(&tracker.bus.client))
}

async fn metrics(State(tracker): State<Arc<Tracker>>) -> Response {
    observe::metrics_response(tracker.metrics().await)
}

/// An app's releases, newest first, summed up (no manifests): what the dashboard offers a
/// rollback to and shows before one. 503 when they cannot be read (NATS unreachable).
async fn app_releases(State(tracker): State<Arc<Tracker>>, Path(app): Path<String>) -> Response {
    let app = match AppName::try_from(app) {
        Ok(app) => app,
        Err(e) => return reply(StatusCode::NOT_FOUND, e.to_string()),
    };
    match tracker.bus.records.release_records(Some(&app)).await {
        Ok(records) => Json(
            records
                .iter()
                .filter(|r| r.app == app)
                .map(ReleaseSummary::from)
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => reply(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The steering actions of the HTTP API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Approve,
    Pause,
    Resume,
    Abort,
    Rollback,
}

impl Action {
    const ALL: [Action; 5] = [
        Action::Approve,
        Action::Pause,
        Action::Resume,
        Action::Abort,
        Action::Rollback,
    ];

    fn name(self) -> &'static str {
        match self {
            Action::Approve => "approve",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Abort => "abort",
            Action::Rollback => "rollback",
        }
    }

    /// The command `body` (JSON; empty for none) asks for on `app`.
    fn command(self, app: AppName, body: &[u8]) -> Result<Command, BadBody> {
        #[derive(Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        struct Approve {
            version: Option<semver::Version>,
            target: Option<fleetcast_events::Selector>,
        }
        #[derive(Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        struct Nothing {}
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Rollback {
            to: semver::Version,
            ring: Option<RingName>,
        }
        fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, BadBody> {
            let body = if body.iter().all(u8::is_ascii_whitespace) {
                b"{}".as_slice()
            } else {
                body
            };
            serde_json::from_slice(body).map_err(BadBody)
        }
        Ok(match self {
            Action::Approve => {
                let Approve { version, target } = parse(body)?;
                Command::Approve {
                    app,
                    version,
                    target,
                }
            }
            Action::Pause => parse::<Nothing>(body).map(|_| Command::Pause { app })?,
            Action::Resume => parse::<Nothing>(body).map(|_| Command::Resume { app })?,
            Action::Abort => parse::<Nothing>(body).map(|_| Command::Abort { app })?,
            Action::Rollback => {
                let Rollback { to, ring } = parse(body)?;
                Command::Rollback { app, to, ring }
            }
        })
    }
}

/// An action's body that is not the action's (answered 400 with why).
#[derive(Debug, thiserror::Error)]
#[error("body: {0}")]
struct BadBody(serde_json::Error);

/// What an action answers: whether it was done, and what the tracker said.
#[derive(Debug, Serialize, Deserialize)]
pub struct ActionReply {
    pub ok: bool,
    pub message: String,
    /// The rollout as the action left it (approve, pause, resume, abort).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSummary>,
}

fn reply(status: StatusCode, message: impl Into<String>) -> Response {
    let body = ActionReply {
        ok: status.is_success(),
        message: message.into(),
        rollout: None,
    };
    (status, Json(body)).into_response()
}

/// 401, asking for a bearer token.
fn unauthorized(message: &str) -> Response {
    let mut response = reply(StatusCode::UNAUTHORIZED, message);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

/// The token entry the request's `Authorization: Bearer` header names, or why there is none
/// (answered with [`unauthorized`]).
fn authenticate<'a>(
    tracker: &'a Tracker,
    headers: &HeaderMap,
) -> Result<&'a TokenEntry, &'static str> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err("sign in: send Authorization: Bearer <token>");
    };
    let token = value.to_str().ok().and_then(crate::auth::bearer);
    token
        .and_then(|t| tracker.settings.http.identify(t))
        .ok_or("unknown token")
}

/// Whether the request says its body is JSON (`application/json`, any parameters).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// An action: 401 without a known token, 415 unless JSON, 400 for a body that is not the
/// action's, 403 for a token that may only read (recorded as refused), else the tracker's
/// answer: 200 done, 409 refused (no rollout, another version, …); recorded either way.
async fn act(
    action: Action,
    State(tracker): State<Arc<Tracker>>,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let who = match authenticate(&tracker, &headers) {
        Ok(who) => who,
        Err(why) => return unauthorized(why),
    };
    if !is_json(&headers) {
        return reply(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "actions take Content-Type: application/json",
        );
    }
    // No rollout can have a name that is not an app's.
    let app = match AppName::try_from(app) {
        Ok(app) => app,
        Err(e) => return reply(StatusCode::NOT_FOUND, e.to_string()),
    };
    let command = match action.command(app, &body) {
        Ok(c) => c,
        Err(e) => return reply(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let actor = format!("http:{}", who.name.as_str());
    if who.role != TokenRole::Operator {
        let why = format!("token {} may only read", who.name.as_str());
        tracing::warn!(%actor, action = action.name(), "action refused: read-only token");
        tracker.refused_action(&actor, &command, &why).await;
        return reply(StatusCode::FORBIDDEN, why);
    }
    let answer = tracker.command(&actor, command).await;
    let status = if answer.ok {
        StatusCode::OK
    } else {
        StatusCode::CONFLICT
    };
    let body = ActionReply {
        ok: answer.ok,
        message: answer.message,
        rollout: answer.rollout,
    };
    (status, Json(body)).into_response()
}

/// With `http.read_requires_token`, a read under `/api/` needs a read or operator token. The
/// page itself is served to anyone (it holds no data; its script sends the token it is given),
/// and so are `/health` and `/metrics`.
async fn reads_need_token(
    State(tracker): State<Arc<Tracker>>,
    request: Request,
    next: Next,
) -> Response {
    let is_read = matches!(*request.method(), Method::GET | Method::HEAD);
    if tracker.settings.http.read_requires_token
        && is_read
        && request.uri().path().starts_with("/api/")
        && let Err(why) = authenticate(&tracker, request.headers())
    {
        return unauthorized(why);
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_actions_body_is_its_own_and_may_be_empty_where_nothing_is_needed() {
        let app = || AppName::from_static("demo");
        let v = |s: &str| semver::Version::parse(s).expect("version");
        assert_eq!(
            Action::Approve.command(app(), b"").ok(),
            Some(Command::Approve {
                app: app(),
                version: None,
                target: None,
            })
        );
        assert_eq!(
            Action::Approve
                .command(app(), br#"{"version":"1.2.0"}"#)
                .ok(),
            Some(Command::Approve {
                app: app(),
                version: Some(v("1.2.0")),
                target: None,
            })
        );
        assert_eq!(
            Action::Approve
                .command(app(), br#"{"target":"role=web"}"#)
                .ok(),
            Some(Command::Approve {
                app: app(),
                version: None,
                target: "role=web".parse().ok(),
            })
        );
        assert!(
            Action::Approve
                .command(app(), br#"{"target":"web"}"#)
                .is_err_and(|e| e.to_string().contains("key=value")),
            "a bad selector is refused with why"
        );
        assert_eq!(
            Action::Pause.command(app(), b"{}").ok(),
            Some(Command::Pause { app: app() })
        );
        assert!(Action::Abort.command(app(), br#"{"force":true}"#).is_err());
        assert!(Action::Approve.command(app(), b"version=1.2.0").is_err());
        assert!(
            Action::Rollback.command(app(), b"{}").is_err(),
            "to is needed"
        );
        assert_eq!(
            Action::Rollback
                .command(app(), br#"{"to":"1.0.0","ring":"canary"}"#)
                .ok(),
            Some(Command::Rollback {
                app: app(),
                to: v("1.0.0"),
                ring: Some(RingName::from_static("canary"))
            })
        );
    }

    #[test]
    fn only_json_is_an_action_body() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, ct.parse().expect("value"));
            is_json(&h)
        };
        assert!(with("application/json"));
        assert!(with("application/json; charset=utf-8"));
        assert!(!with("application/x-www-form-urlencoded"));
        assert!(!with("text/plain"));
        assert!(!with("multipart/form-data; boundary=x"));
        assert!(!is_json(&HeaderMap::new()));
    }
}
