//! The demo application the agent supervises in demos and tests. It serves `GET /version` and
//! `GET /health` (on a socket its supervisor hands over, `LISTEN_FDS`, or its own port), and
//! its own settings can make it misbehave on purpose: crash at start, fail its health check,
//! start slowly, or take long to drain on SIGTERM. Settings come from `--config FILE` and
//! `FLEETCAST_DEMO_APP_*` variables, like every fleetcast binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use serde::Deserialize;

/// Longest a connection taken before the stop may take to be served before the connections
/// left are shut down (see `run`).
const SETTLE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Settings {
    /// Loopback port to serve on, unless a listening socket is handed over (`LISTEN_FDS`).
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
    /// On SIGTERM, stop taking connections and keep finishing the current job this long
    /// before exiting.
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
    let version = version(&settings);
    if settings.crash_at_start {
        eprintln!("demo-app {version}: crashing at start, as configured");
        std::process::exit(settings.exit_code.into());
    }
    tokio::time::sleep(settings.start_delay).await;
    let app = router(version.clone(), !settings.fail_health);
    let listener = listener(settings.port).await?;
    tracing::info!(%version, addr = %listener.local_addr()?, "demo-app serving");
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    accept_until(&listener, app, &connections, &shutdown).await;
    // Drain: take no new connection (on a handed-over socket they wait in the kernel's queue
    // for the next version), and finish the ones taken.
    drop(listener);
    drain(settings.drain, connections).await;
    if let Some(marker) = settings.drain_marker {
        std::fs::write(marker, version)?;
    }
    tracing::info!("drained, exiting");
    Ok(())
}

/// The version it says it is: the setting, else the package's `VERSION` file, else its own.
fn version(settings: &Settings) -> String {
    settings.version.clone().unwrap_or_else(|| {
        std::fs::read_to_string("VERSION")
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|_| env!("CARGO_PKG_VERSION").into())
    })
}

fn router(version: String, healthy: bool) -> Router {
    Router::new()
        .route("/version", get(move || async move { version }))
        .route(
            "/health",
            get(move || async move {
                if healthy {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "unhealthy, as configured")
                }
            }),
        )
}

/// A socket its supervisor hands over (systemd's socket-activation protocol, as the fleetcast
/// agent does with `apps[].listen`), else its own on `port`.
async fn listener(port: u16) -> anyhow::Result<tokio::net::TcpListener> {
    Ok(match listenfd::ListenFd::from_env().take_tcp_listener(0)? {
        Some(listener) => {
            listener.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(listener)?
        }
        None => tokio::net::TcpListener::bind(("127.0.0.1", port)).await?,
    })
}

/// Serves each connection `listener` takes, watched by `connections`, until `shutdown`.
async fn accept_until(
    listener: &tokio::net::TcpListener,
    app: Router,
    connections: &hyper_util::server::graceful::GracefulShutdown,
    shutdown: &tokio_util::sync::CancellationToken,
) {
    let service = hyper_util::service::TowerToHyperService::new(app);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service.clone());
                let connection = connections.watch(connection);
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            () = shutdown.cancelled() => break,
        }
    }
}

/// Waits `drain`, then finishes the connections taken. A connection taken just before may not
/// have sent its request yet, and hyper closes such a connection on shutdown as idle: the open
/// ones (those it still watches) get up to SETTLE to be served first; a stop with none open
/// waits for nothing.
async fn drain(drain: Duration, connections: hyper_util::server::graceful::GracefulShutdown) {
    tracing::info!(?drain, "draining");
    tokio::time::sleep(drain).await;
    let settled = tokio::time::Instant::now() + SETTLE;
    while connections.count() > 0 && tokio::time::Instant::now() < settled {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    connections.shutdown().await;
}
