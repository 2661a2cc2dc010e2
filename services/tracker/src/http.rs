//! HTTP: the dashboard (`/`), the JSON API (`/api/agents`: the inventory, stale ones marked;
//! `/api/rollouts`: each app's rollout with its progress per ring; both filter with `?app=`,
//! `?ring=`), Prometheus `/metrics`, `/health`.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use crate::api::{AgentRow, RolloutView};
use crate::service::Tracker;

pub fn router(tracker: Arc<Tracker>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(include_str!("dashboard.html")) }))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/api/agents", get(agents))
        .route("/api/rollouts", get(rollouts))
        .with_state(tracker)
}

/// `?app=` and `?ring=` narrow a listing.
#[derive(Debug, Default, Deserialize)]
struct Filter {
    app: Option<String>,
    ring: Option<String>,
}

async fn agents(
    State(tracker): State<Arc<Tracker>>,
    Query(filter): Query<Filter>,
) -> Json<Vec<AgentRow>> {
    let mut rows = tracker.agents().await;
    rows.retain(|row| {
        filter.ring.as_ref().is_none_or(|r| row.agent.ring == *r)
            && filter
                .app
                .as_ref()
                .is_none_or(|a| row.agent.apps.contains_key(a))
    });
    Json(rows)
}

async fn rollouts(
    State(tracker): State<Arc<Tracker>>,
    Query(filter): Query<Filter>,
) -> Json<Vec<RolloutView>> {
    let mut views = tracker.rollouts().await;
    views.retain(|v| filter.app.as_ref().is_none_or(|a| v.rollout.app == *a));
    if let Some(ring) = &filter.ring {
        for v in &mut views {
            v.rings.retain(|r| r.ring == *ring);
        }
    }
    Json(views)
}

async fn metrics(State(tracker): State<Arc<Tracker>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        tracker.metrics().await,
    )
}
