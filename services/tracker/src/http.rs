//! HTTP JSON API: `/api/agents` (the inventory, stale ones marked), `/api/rollouts` (each app's
//! rollout with its progress per ring), `/health`.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use crate::api::{AgentRow, RolloutView};
use crate::service::Tracker;

pub fn router(tracker: Arc<Tracker>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/api/agents", get(agents))
        .route("/api/rollouts", get(rollouts))
        .with_state(tracker)
}

async fn agents(State(tracker): State<Arc<Tracker>>) -> Json<Vec<AgentRow>> {
    Json(tracker.agents().await)
}

async fn rollouts(State(tracker): State<Arc<Tracker>>) -> Json<Vec<RolloutView>> {
    Json(tracker.rollouts().await)
}
