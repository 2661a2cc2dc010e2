//! The tracker: keeps the fleet inventory from agents' reports and drives staged rollouts.
//!
//! [`policy`] is the per-app rollout policy, [`fleet`] the inventory, [`rollout`] the pure
//! state machine ([`timeline`]: its hosts by state over time); [`service`] runs them on the
//! bus, [`http`] serves the API, the dashboard, its other pages ([`pages`], [`releases`]) and
//! [`metrics`]; [`history`] records what happened and [`webhook`] forwards it to HTTP
//! receivers. What operators exchange with it (commands, replies, the API's views) is the wire
//! contract's, in `fleetcast_events::tracker`.

pub mod auth;
pub mod fleet;
pub mod history;
pub mod http;
pub mod laggards;
pub mod metrics;
pub mod pages;
pub mod policy;
pub mod releases;
pub mod rollout;
pub mod service;
pub mod settings;
pub mod timeline;
pub mod webhook;

use std::sync::Arc;

use fleetcast_runtime::bus::Role;
use fleetcast_runtime::https::HttpListener;
use fleetcast_runtime::{Bus, BusError};
use tokio_util::sync::CancellationToken;

pub use settings::Settings;

pub const SERVICE: &str = "tracker";

/// Why the tracker cannot start, or one of its loops stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error(transparent)]
    Settings(#[from] fleetcast_runtime::SettingsError),
    #[error(transparent)]
    Bus(#[from] BusError),
    /// One of the tracker's buckets could not be read or written (NATS unavailable, a
    /// timeout); what was not saved is saved on the next pass.
    #[error("{bucket} {key}: {cause}")]
    Store {
        bucket: &'static str,
        key: String,
        cause: async_nats::Error,
    },
    /// A release record or a desired state (see `RecordError::is_transient`).
    #[error(transparent)]
    Records(#[from] fleetcast_runtime::releases::RecordError),
    #[error(transparent)]
    History(#[from] crate::history::HistoryError),
    /// A consumer, subscription or stream it needs could not be set up or followed.
    #[error("{what}: {cause}")]
    Follow {
        what: &'static str,
        cause: async_nats::Error,
    },
    /// A webhook's secret, TLS or consumer.
    #[error(transparent)]
    Webhook(#[from] webhook::WebhookError),
    #[error("cannot listen on {addr}: {cause}")]
    Listen {
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
    /// The HTTPS certificate or key.
    #[error("tls: {0}")]
    Tls(fleetcast_runtime::https::HttpsError),
    #[error(
        "reply_credentials not set: the tracker answers slot requests and commands from a \
         connection whose identity may publish to inboxes only (creds/tracker-reply.creds of \
         ops/nats/gen-accounts); set it, or nats.insecure_dev for local development"
    )]
    NoReplyCredentials,
}

impl TrackerError {
    pub(crate) fn store(
        bucket: &'static str,
        key: &str,
        cause: impl Into<async_nats::Error>,
    ) -> Self {
        TrackerError::Store {
            bucket,
            key: key.to_string(),
            cause: cause.into(),
        }
    }

    pub(crate) fn follow(what: &'static str, cause: impl Into<async_nats::Error>) -> Self {
        TrackerError::Follow {
            what,
            cause: cause.into(),
        }
    }
}

/// Connects, creating what is missing, and binds what the tracker uses.
async fn connect(
    nats: &fleetcast_runtime::NatsSettings,
    shutdown: &CancellationToken,
) -> Result<service::TrackerBus, BusError> {
    let bus = Bus::connect(nats, SERVICE, shutdown).await?;
    bus.bind(shutdown, || service::TrackerBus::bind(&bus)).await
}

pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), TrackerError> {
    settings.validate()?;
    // Secrets read before anything starts: a webhook that could not sign is a refusal to start.
    let webhooks = webhook::prepare(&settings.webhooks)?;
    let bus = match connect(&settings.nats, &shutdown).await {
        Err(BusError::Cancelled) => return Ok(()),
        other => other?,
    };
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|cause| TrackerError::Listen {
            addr: settings.listen,
            cause,
        })?;
    // HTTPS when a certificate is configured (the API and dashboard then never go in clear).
    let http = HttpListener::new(listener, settings.tls.as_ref()).map_err(TrackerError::Tls)?;
    let Some(replies) = reply_connection(&settings, &bus, &shutdown).await? else {
        return Ok(());
    };
    warn_of_tokens_in_clear(&settings);
    let tracker = service::Tracker::load(bus, replies, Arc::new(settings)).await?;
    tracing::info!(listen = %tracker.settings.listen, "tracker serving");
    let mut tasks = spawn_loops(&tracker, webhooks, &shutdown);
    let app = http::router(tracker.clone());
    tasks.spawn(async move {
        if let Err(e) = http.serve(app, shutdown).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// The connection replies go out on: one whose identity may write inboxes only (`None`: shut
/// down before NATS was reachable).
async fn reply_connection(
    settings: &Settings,
    bus: &Bus,
    shutdown: &CancellationToken,
) -> Result<Option<async_nats::Client>, TrackerError> {
    match &settings.reply_credentials {
        Some(creds) => {
            let nats = fleetcast_runtime::NatsSettings {
                credentials: Some(creds.clone()),
                ..settings.nats.clone()
            };
            match fleetcast_runtime::bus::connect(&nats, "tracker-reply", shutdown).await {
                Ok((client, _)) => Ok(Some(client)),
                Err(BusError::Cancelled) => Ok(None),
                Err(e) => Err(e.into()),
            }
        }
        // Closed by default: without an identity of their own, replies would go out on a
        // connection that may write far more than inboxes.
        None if !settings.nats.insecure_dev => Err(TrackerError::NoReplyCredentials),
        None => Ok(Some(bus.client.clone())),
    }
}

/// Tokens sent in clear to a listener others reach can be read on the way.
fn warn_of_tokens_in_clear(settings: &Settings) {
    if !settings.http.tokens.is_empty()
        && settings.tls.is_none()
        && !settings.listen.ip().is_loopback()
    {
        tracing::warn!(listen = %settings.listen, "http.tokens set but no tls: bearer tokens cross the network in clear; set tls.cert_file and tls.key_file");
    }
}

/// The tracker's loops, each on a task of its own until `shutdown`: the reports, the ticks,
/// the release stream's consumers, the slot and command services, the webhooks.
fn spawn_loops(
    tracker: &Arc<service::Tracker>,
    webhooks: Vec<Arc<webhook::Webhook>>,
    shutdown: &CancellationToken,
) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(tracker.clone().follow_reports(shutdown.clone()));
    tasks.spawn(tracker.clone().run_ticks(shutdown.clone()));
    tasks.spawn(logged(
        "release consumer",
        tracker.clone().follow_releases(shutdown.clone()),
    ));
    tasks.spawn(logged(
        "rollback consumer",
        tracker.clone().follow_rollbacks(shutdown.clone()),
    ));
    tasks.spawn(logged(
        "history of the pipeline",
        tracker.clone().follow_pipeline(shutdown.clone()),
    ));
    tasks.spawn(logged(
        "slot service",
        tracker.clone().serve_slots(shutdown.clone()),
    ));
    tasks.spawn(logged(
        "command service",
        tracker.clone().serve_commands(shutdown.clone()),
    ));
    for hook in webhooks {
        tasks.spawn(logged(
            "webhook",
            webhook::forward(tracker.clone(), hook, shutdown.clone()),
        ));
    }
    tasks
}

/// Runs one of the tracker's loops, logging why it stopped if it could not go on.
async fn logged<E: std::fmt::Display>(
    what: &'static str,
    work: impl Future<Output = Result<(), E>>,
) {
    if let Err(e) = work.await {
        tracing::error!(error = %e, "{what} stopped");
    }
}

/// The `fleetcast-tracker` program: its settings from its config file and environment, run until
/// a signal. (Also what the `fleetcast` binary runs when called by this name: the container
/// image's multi-call binary.)
pub fn main() -> std::process::ExitCode {
    fleetcast_runtime::service::service_main(
        SERVICE,
        &[],
        fleetcast_runtime::service::Threads::PerCore,
        run,
    )
}
