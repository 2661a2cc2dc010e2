//! The demo application the agent supervises in demos and tests. It serves `GET /version` and
//! `GET /health`, and its own settings can make it misbehave on purpose: crash at start, fail
//! its health check, start slowly, or take long to drain on SIGTERM. Settings come from
//! `--config FILE` and `FLEETCAST_DEMO_APP_*` variables, like every fleetcast binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Settings {
    /// Loopback port to serve on.
    port: u16,
    /// Version to report; default: the `VERSION` file in the working folder, else the build's.
    version: Option<String>,
    /// Exit with `exit_code` right after start (a release that crash-loops).
    crash_at_start: bool,
    exit_code: u8,
    /// Answer 503 on /health (a release that starts but is unhealthy).
    fail_health: bool,
    /// Wait this long before listening (a slow start).
    #[serde(with = "humantime_serde")]
    start_delay: Duration,
    /// On SIGTERM, keep finishing the current job this long before exiting.
    #[serde(with = "humantime_serde")]
    drain: Duration,
    /// File written once draining finished, so tests can tell a drained stop from a kill.
    drain_marker: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            port: 8080,
            version: None,
            crash_at_start: false,
            exit_code: 1,
            fail_health: false,
            start_delay: Duration::ZERO,
            drain: Duration::ZERO,
            drain_marker: None,
        }
    }
}

fn main() -> ExitCode {
    fleetcast_runtime::service::service_main(
        "demo_app",
        &[],
        fleetcast_runtime::service::Threads::PerCore,
        run,
    )
}

async fn run(
    settings: Settings,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let version = settings.version.clone().unwrap_or_else(|| {
        std::fs::read_to_string("VERSION")
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|_| env!("CARGO_PKG_VERSION").into())
    });
    if settings.crash_at_start {
        eprintln!("demo-app {version}: crashing at start, as configured");
        std::process::exit(settings.exit_code.into());
    }
    tokio::time::sleep(settings.start_delay).await;
    let healthy = !settings.fail_health;
    let reported = version.clone();
    let app = Router::new()
        .route("/version", get(move || async move { reported }))
        .route(
            "/health",
            get(move || async move {
                if healthy {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "unhealthy, as configured")
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", settings.port)).await?;
    tracing::info!(%version, port = settings.port, "demo-app serving");
    let drain = settings.drain;
    let marker = settings.drain_marker.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.cancelled().await;
            tracing::info!(?drain, "draining");
            tokio::time::sleep(drain).await;
        })
        .await?;
    if let Some(marker) = marker {
        std::fs::write(marker, version)?;
    }
    tracing::info!("drained, exiting");
    Ok(())
}
