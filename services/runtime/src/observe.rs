//! The operations endpoint of a service: `GET /health` and `GET /metrics` on a small HTTP
//! server of its own (the tracker serves the same two on its API's address).
//!
//! `/health` answers 200 `ok` while the service runs and is connected to NATS, 503 with the
//! reason while it is not (still connecting at start, or reconnecting after losing the
//! connection): a service cut off from NATS does no work, and container health checks and load
//! balancers should see that. `/metrics` is the service's own registry (see [`crate::metrics`])
//! plus two gauges every service exports, which the endpoint adds to it:
//! `fleetcast_<service>_build_info` and `fleetcast_<service>_nats_connected`.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::connection::State;
use axum::Router;
use axum::extract::State as Shared;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::https::HttpsSettings;
use crate::metrics::{self, NO_LABELS};
use crate::{Bus, BusError, NatsSettings};

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("cannot serve /health and /metrics on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
}

/// The names a service reports itself under, written out in full by each service (see
/// [`crate::metrics`] for why).
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    /// `fleetcast_<service>_build_info`: always 1, the version in its `version` label.
    pub build_info: &'static str,
    /// `fleetcast_<service>_nats_connected`: 1 while connected to NATS, else 0.
    pub nats_connected: &'static str,
    /// The service's version (its crate's `CARGO_PKG_VERSION`).
    pub version: &'static str,
}

/// Whether a service connected through `nats` (none yet: still connecting) can work.
pub fn health(nats: Option<&async_nats::Client>) -> Result<(), &'static str> {
    match nats.map(async_nats::Client::connection_state) {
        Some(State::Connected) => Ok(()),
        Some(State::Disconnected) => Err("NATS connection lost; reconnecting"),
        Some(State::Pending) | None => Err("not connected to NATS yet"),
    }
}

/// `/health` as an HTTP response: 200 `ok`, or 503 with the reason.
pub fn health_response(nats: Option<&async_nats::Client>) -> impl IntoResponse + use<> {
    let (status, body) = match health(nats) {
        Ok(()) => (StatusCode::OK, "ok"),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
    };
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
}

/// Adds the gauges every service exports about itself to its `registry`; `nats` is the
/// service's client once it has connected (`nats_connected` is read from it at each scrape).
pub fn register_identity(
    registry: &mut Registry,
    identity: Identity,
    nats: Arc<OnceLock<async_nats::Client>>,
) {
    registry.register_collector(Box::new(Reported { identity, nats }));
}

/// The identity gauges: `nats_connected` changes with the connection, so it is read per scrape.
#[derive(Debug)]
struct Reported {
    identity: Identity,
    nats: Arc<OnceLock<async_nats::Client>>,
}

impl Collector for Reported {
    fn encode(&self, mut out: DescriptorEncoder) -> fmt::Result {
        let Identity {
            build_info,
            nats_connected,
            version,
        } = self.identity;
        metrics::gauges(
            &mut out,
            build_info,
            "Always 1; the service's version is in the `version` label.",
            [([("version", version)], 1)],
        )?;
        let connected = u32::from(health(self.nats.get()).is_ok());
        metrics::gauges(
            &mut out,
            nats_connected,
            "1 while the service is connected to NATS, 0 while it is connecting or reconnecting.",
            [(NO_LABELS, connected)],
        )
    }
}

/// A `/metrics` body as an HTTP response. Encoding into a string fails only if a collector
/// does: then the scrape fails visibly rather than serving part of the metrics.
pub fn metrics_response(body: Result<String, fmt::Error>) -> Response {
    match body {
        Ok(body) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response(),
        Err(_) => {
            tracing::error!("/metrics: a collector failed to encode its metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics",
            )
                .into_response()
        }
    }
}

/// What a service's endpoint serves: its NATS client once connected, its registry.
pub struct Endpoint {
    nats: Arc<OnceLock<async_nats::Client>>,
    registry: Registry,
}

impl Endpoint {
    /// `registry` holds the service's own metrics; the endpoint adds its identity to it.
    pub fn new(identity: Identity, mut registry: Registry) -> Arc<Endpoint> {
        let nats = Arc::new(OnceLock::new());
        register_identity(&mut registry, identity, nats.clone());
        Arc::new(Endpoint { nats, registry })
    }

    /// The service is connected: health and `nats_connected` follow this client from now on
    /// (it reconnects by itself, so it is set once).
    pub fn connected(&self, client: &async_nats::Client) {
        let _ = self.nats.set(client.clone());
    }

    pub fn render(&self) -> Result<String, fmt::Error> {
        metrics::encode(&[&self.registry])
    }
}

pub fn router(endpoint: Arc<Endpoint>) -> Router {
    Router::new()
        .route(
            "/health",
            get(|Shared(e): Shared<Arc<Endpoint>>| async move { health_response(e.nats.get()) }),
        )
        .route(
            "/metrics",
            get(|Shared(e): Shared<Arc<Endpoint>>| async move { metrics_response(e.render()) }),
        )
        .with_state(endpoint)
}

/// A running endpoint; it stops when `shutdown` fires or when this is dropped (a service whose
/// `run` returned, even with an error, leaves no listener behind).
pub struct Serving {
    addr: SocketAddr,
    _stop: DropGuard,
}

impl Serving {
    /// The address it listens on (the actual port when the settings said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Listens on `addr` and serves [`router`] there until `shutdown`. A service calls it before
/// connecting to NATS: an address it cannot listen on is a configuration error found at once,
/// and `/health` says "not connected" while it connects.
pub async fn serve(
    addr: SocketAddr,
    tls: Option<&HttpsSettings>,
    endpoint: Arc<Endpoint>,
    shutdown: &CancellationToken,
) -> Result<Serving, ObserveError> {
    let fail = |e: std::io::Error| ObserveError::Listen {
        addr,
        reason: e.to_string(),
    };
    let listener = bind(addr).await.map_err(fail)?;
    let local = listener.local_addr().map_err(fail)?;
    let stop = shutdown.child_token();
    let stopped = stop.clone();
    let listener =
        crate::https::HttpListener::new(listener, tls).map_err(|e| ObserveError::Listen {
            addr,
            reason: e.to_string(),
        })?;
    tokio::spawn(async move {
        if let Err(e) = listener.serve(router(endpoint), stopped).await {
            tracing::error!(error = %e, "/health and /metrics endpoint stopped");
        }
    });
    tracing::info!(listen = %local, "serving /health and /metrics");
    Ok(Serving {
        addr: local,
        _stop: stop.drop_guard(),
    })
}

/// How a pipeline service starts: its endpoint first (an address it cannot listen on is a
/// configuration error found at once, and `/health` says "not connected" meanwhile), then
/// NATS, creating the streams and buckets that are missing ([`Bus::connect`]), then its role's
/// handle `R`. `None`: shut down before NATS was reachable.
pub async fn serve_and_connect<E, R: crate::bus::Role>(
    service: &str,
    nats: &NatsSettings,
    listen: SocketAddr,
    tls: Option<&HttpsSettings>,
    endpoint: Arc<Endpoint>,
    shutdown: &CancellationToken,
) -> Result<Option<(R, Serving)>, E>
where
    E: From<ObserveError> + From<BusError>,
{
    let serving = serve(listen, tls, endpoint.clone(), shutdown).await?;
    let bus = match Bus::connect(nats, service, shutdown).await {
        Err(BusError::Cancelled) => return Ok(None),
        other => other?,
    };
    endpoint.connected(&bus.client);
    let role = match bus.bind(shutdown, || R::bind(&bus)).await {
        Err(BusError::Cancelled) => return Ok(None),
        other => other?,
    };
    Ok(Some((role, serving)))
}

/// What a pipeline service's settings say about its start-up: how it reaches NATS and where
/// its endpoint listens. Implemented with [`crate::endpoint_settings!`] over the settings'
/// fields of those names (operators set them as `nats`, `metrics_listen`, `metrics_tls`).
pub trait EndpointSettings {
    fn nats(&self) -> &NatsSettings;
    fn metrics_listen(&self) -> SocketAddr;
    fn metrics_tls(&self) -> Option<&HttpsSettings>;
}

/// Implements [`EndpointSettings`] for a settings struct from its `nats`, `metrics_listen` and
/// `metrics_tls` fields. A macro, as the settings stay flat structs (their fields are the
/// configuration keys, and serde's `deny_unknown_fields` does not work through a shared,
/// flattened part).
#[macro_export]
macro_rules! endpoint_settings {
    ($settings:ty) => {
        impl $crate::observe::EndpointSettings for $settings {
            fn nats(&self) -> &$crate::NatsSettings {
                &self.nats
            }
            fn metrics_listen(&self) -> ::std::net::SocketAddr {
                self.metrics_listen
            }
            fn metrics_tls(&self) -> ::std::option::Option<&$crate::https::HttpsSettings> {
                self.metrics_tls.as_ref()
            }
        }
    };
}

impl Endpoint {
    /// Starts a pipeline service as its `settings` say: [`serve_and_connect`] with this
    /// endpoint. `None`: shut down before NATS was reachable.
    pub async fn start<E, R: crate::bus::Role>(
        self: Arc<Self>,
        service: &str,
        settings: &impl EndpointSettings,
        shutdown: &CancellationToken,
    ) -> Result<Option<(R, Serving)>, E>
    where
        E: From<ObserveError> + From<BusError>,
    {
        serve_and_connect(
            service,
            settings.nats(),
            settings.metrics_listen(),
            settings.metrics_tls(),
            self,
            shutdown,
        )
        .await
    }
}

/// Binds, waiting briefly while the address is in use: a service restarted within its process
/// (tests, benchmarks) can start before its predecessor's endpoint, told to stop, has let go.
async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDENTITY: Identity = Identity {
        build_info: "demo_build_info",
        nats_connected: "demo_nats_connected",
        version: "1.2.3",
    };

    #[test]
    fn not_connected_yet_is_unhealthy_and_reported() {
        assert_eq!(health(None), Err("not connected to NATS yet"));
        let body = Endpoint::new(IDENTITY, Registry::default())
            .render()
            .expect("encode");
        assert!(
            body.contains("demo_build_info{version=\"1.2.3\"} 1\n"),
            "{body}"
        );
        assert!(body.contains("demo_nats_connected 0\n"), "{body}");
    }

    #[tokio::test]
    async fn serves_health_and_metrics_until_dropped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let shutdown = CancellationToken::new();
        let serving = serve(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            None,
            Endpoint::new(IDENTITY, Registry::default()),
            &shutdown,
        )
        .await
        .expect("serve");
        let addr = serving.local_addr();
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            s.write_all(request.as_bytes()).await.expect("send");
            let mut response = String::new();
            s.read_to_string(&mut response).await.expect("read");
            response
        };
        let health = get("/health").await;
        assert!(health.starts_with("HTTP/1.1 503"), "{health}");
        assert!(health.ends_with("not connected to NATS yet"), "{health}");
        let metrics = get("/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(metrics.contains("text/plain; version=0.0.4"), "{metrics}");
        assert!(metrics.contains("demo_nats_connected 0"), "{metrics}");
        drop(serving);
        // The listener closes once the server has noticed; a new one binds the same port.
        let again = bind(addr).await.expect("port released");
        drop(again);
    }
}
