//! The dashboard's pages besides the main one, and what they read: `/history` (the history,
//! filtered), `/releases` (every release and the hosts that run it, from
//! `/api/releases?app=`), `/rollout?app=` (a rollout's hosts by state over time, from
//! `/api/rollouts/{app}/timeline`), and the files they share under `/assets/` (the helpers the
//! main page uses too, the banner and the links between pages, the style, the vendored uPlot
//! the timeline is drawn with). Every file is compiled in: the tracker serves no file from disk.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fleetcast_events::AppName;
use serde::Deserialize;

use crate::service::Tracker;

pub fn router() -> Router<Arc<Tracker>> {
    Router::new()
        .route(
            "/history",
            get(|| async { Html(include_str!("history.html")) }),
        )
        .route(
            "/releases",
            get(|| async { Html(include_str!("releases.html")) }),
        )
        .route(
            "/rollout",
            get(|| async { Html(include_str!("rollout.html")) }),
        )
        .route("/assets/{file}", get(asset))
        .route("/api/releases", get(releases))
        .route("/api/rollouts/{app}/timeline", get(timeline))
}

/// The shared files, by name: (content type, content).
const ASSETS: [(&str, &str, &str); 5] = [
    (
        "common.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/common.js"),
    ),
    (
        "pages.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/pages.js"),
    ),
    (
        "common.css",
        "text/css; charset=utf-8",
        include_str!("assets/common.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("assets/uPlot.min.css"),
    ),
];

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => {
            ([(header::CONTENT_TYPE, *content_type)], *body).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[derive(Debug, Default, Deserialize)]
struct AppFilter {
    app: Option<String>,
}

/// Every release record (`?app=`), by app, newest version first, with the hosts that run
/// each; 503 when the releases bucket cannot be read (NATS unreachable), 400 for an app name
/// that cannot be one.
async fn releases(
    State(tracker): State<Arc<Tracker>>,
    Query(filter): Query<AppFilter>,
) -> Response {
    let app = match filter.app.map(AppName::try_from).transpose() {
        Ok(app) => app,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    if !tracker.is_connected() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the tracker is cut off from NATS: the releases cannot be read",
        )
            .into_response();
    }
    match tracker.releases(app.as_ref()).await {
        Ok(apps) => Json(apps).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

/// The app's rollout with its timeline and marks; 404 when the app has no rollout.
async fn timeline(State(tracker): State<Arc<Tracker>>, Path(app): Path<String>) -> Response {
    let Ok(app) = AppName::try_from(app.as_str()) else {
        return (StatusCode::NOT_FOUND, format!("no rollout of {app}")).into_response();
    };
    match tracker.timeline(&app).await {
        Some(view) => Json(view).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no rollout of {app}")).into_response(),
    }
}
