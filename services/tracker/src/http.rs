//! HTTP: the dashboard (`/`), the JSON API (`/api/agents`: the inventory, stale ones marked;
//! `/api/rollouts`: each app's rollout with its progress per ring; both filter with `?app=`,
//! `?ring=`; `/api/history`: what fleetcast did and who asked), the other pages and their
//! API ([`crate::pages`]: `/history`, `/releases`, `/rollout`), Prometheus `/metrics`,
//! `/health` (both as every service serves them, from
//! `fleetcast_runtime::observe`, with the tracker's own gauges added to `/metrics`).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use fleetcast_runtime::metrics::Exposition;
use fleetcast_runtime::observe;
use serde::Deserialize;

use crate::api::{AgentRow, HistoryQuery, RolloutView};
use crate::service::Tracker;

pub fn router(tracker: Arc<Tracker>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(include_str!("dashboard.html")) }))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/agents", get(agents))
        .route("/api/rollouts", get(rollouts))
        .route("/api/history", get(history))
        .merge(crate::pages::router())
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

/// The history (`?app=`, `?kind=`, `?version=`, `?actor=`, `?limit=`), oldest first; 503 when
/// it cannot be read (NATS unreachable).
async fn history(
    State(tracker): State<Arc<Tracker>>,
    Query(query): Query<HistoryQuery>,
) -> axum::response::Response {
    match tracker.history.list(&query).await {
        Ok(entries) => Json(entries).into_response(),
        Err(e) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, e).into_response(),
    }
}

/// 503 while the tracker is cut off from NATS: it then neither hears agents nor moves rollouts.
async fn health(State(tracker): State<Arc<Tracker>>) -> impl IntoResponse {
    observe::health_response(Some(&tracker.bus.client))
}

async fn metrics(State(tracker): State<Arc<Tracker>>) -> impl IntoResponse {
    let mut out = Exposition::new();
    observe::write_identity(
        &mut out,
        &crate::metrics::IDENTITY,
        Some(&tracker.bus.client),
    );
    let mut body = out.into_string();
    body.push_str(&tracker.metrics().await);
    observe::metrics_response(body)
}
