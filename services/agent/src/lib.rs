//! The agent: runs on every host, supervises the applications of its config and moves each to
//! its desired version safely.
//!
//! [`supervisor`] runs the app in its own process group (backoff, crash-loop pause, drain);
//! [`install`] keeps versions side by side with an atomic `current`; [`assemble`] builds a
//! verified version from reused and fetched chunks; [`health`] is the gate a new version must
//! pass; [`journal`] makes every step recoverable; [`updater`] runs the update and rollback;
//! [`window`] holds switches to the update windows; [`fault`] has the crash-matrix points.

pub mod assemble;
pub mod crash_policy;
pub mod fault;
pub mod health;
pub mod install;
pub mod journal;
mod memory;
pub mod settings;
pub mod supervisor;
pub mod updater;

use std::time::Duration;

use fleetcast_events::Encoding;
use fleetcast_events::names::{agent_heartbeat_subject, desired_key};
use fleetcast_events::v1::{AgentHeartbeat, DesiredState};
use fleetcast_runtime::{Bus, BusError};
use futures::StreamExt;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use settings::Settings;
use updater::{AppRunner, UpdateError};

pub const SERVICE: &str = "agent";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Settings(#[from] fleetcast_runtime::SettingsError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("app {app}: {source}")]
    App { app: String, source: UpdateError },
}

/// Runs every configured app and keeps it on its desired version until `shutdown`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), AgentError> {
    settings.validate()?;
    let trusted = fleetcast_runtime::settings::trusted_keys(
        &settings.trusted_keys,
        &settings.trusted_key_files,
    )?;
    let bus = match Bus::connect(
        &settings.nats,
        &format!("agent-{}", settings.agent_id),
        &shutdown,
    )
    .await
    {
        Err(BusError::Cancelled) => return Ok(()),
        other => other?,
    };
    let host = std::sync::Arc::new(settings.clone());
    let mut tasks = Vec::new();
    let mut beats = Vec::new();
    for app in &settings.apps {
        let runner = AppRunner::new(app.clone(), host.clone(), trusted.clone(), bus.clone())
            .map_err(|source| AgentError::App {
                app: app.name.clone(),
                source,
            })?;
        let (tx, rx) = watch::channel(runner.heartbeat());
        beats.push(rx);
        let key = desired_key(&app.name, &settings.ring);
        tasks.push(tokio::spawn(app_loop(
            runner,
            bus.clone(),
            key,
            settings.recheck,
            tx,
            shutdown.clone(),
        )));
    }
    let mut ticker = tokio::time::interval(settings.heartbeat);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {
                let beat = AgentHeartbeat {
                    agent_id: settings.agent_id.clone(),
                    host: std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default(),
                    ring: settings.ring.clone(),
                    labels: settings.labels.clone(),
                    apps: beats.iter().map(|b| b.borrow().clone()).collect(),
                    at: OffsetDateTime::now_utc(),
                };
                let subject = agent_heartbeat_subject(&settings.agent_id);
                if let Err(e) = bus.publish_event(&subject, &beat, Encoding::MsgPack, None).await {
                    tracing::debug!(error = %e, "heartbeat not published");
                }
            }
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}

/// One app: recover, then follow its desired-state key (watch, plus a slow re-check, plus
/// retries with backoff after transient failures).
async fn app_loop(
    mut runner: AppRunner,
    bus: Bus,
    key: String,
    recheck: Duration,
    beat: watch::Sender<fleetcast_events::v1::AppHeartbeat>,
    shutdown: CancellationToken,
) {
    let app = runner.settings.name.clone();
    if let Err(e) = runner.recover().await {
        tracing::error!(%app, error = %e, "recovery failed");
    }
    let _ = beat.send(runner.heartbeat());
    let mut retry_delay = Duration::from_secs(1);
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut ticker = tokio::time::interval(recheck);
    loop {
        let mut updates = match bus.desired.watch(&key).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(%app, error = %e, "cannot watch desired state, retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let desired: Option<Vec<u8>> = tokio::select! {
                _ = shutdown.cancelled() => {
                    runner.stop().await;
                    return;
                }
                entry = updates.next() => match entry {
                    Some(Ok(entry)) if matches!(entry.operation, async_nats::jetstream::kv::Operation::Put) => Some(entry.value.to_vec()),
                    Some(Ok(_)) => None,
                    Some(Err(e)) => {
                        tracing::debug!(%app, error = %e, "watch hiccup");
                        None
                    }
                    None => break, // watch ended: recreate it
                },
                _ = ticker.tick() => bus.desired.get(&key).await.ok().flatten().map(|b| b.to_vec()),
                _ = async { tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)).await }, if retry_at.is_some() => {
                    retry_at = None;
                    bus.desired.get(&key).await.ok().flatten().map(|b| b.to_vec())
                }
            };
            let Some(bytes) = desired else { continue };
            let desired: DesiredState = match Encoding::Json
                .decode(&bytes)
                .or_else(|_| Encoding::MsgPack.decode(&bytes))
            {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(%app, error = %e, "desired state does not decode; ignored");
                    continue;
                }
            };
            let outcome = runner.apply(&desired).await;
            // An update's buffers are free now; hand them back so an idle agent stays small.
            memory::release_freed();
            match outcome {
                Ok(()) => retry_delay = Duration::from_secs(1),
                Err(UpdateError::Refused(reason)) => {
                    tracing::warn!(%app, version = %desired.version, %reason, "update refused");
                    runner.refused(&desired.version, &reason).await;
                }
                Err(UpdateError::NotNow(opens)) => {
                    let wait = (opens - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
                    tracing::info!(%app, version = %desired.version, %opens, "staged; the switch waits");
                    retry_at = Some(
                        tokio::time::Instant::now() + Duration::try_from(wait).unwrap_or_default(),
                    );
                }
                Err(UpdateError::Transient(reason)) => {
                    tracing::warn!(%app, version = %desired.version, %reason, retry_in = ?retry_delay, "update failed, will retry");
                    retry_at = Some(tokio::time::Instant::now() + retry_delay);
                    retry_delay = (retry_delay * 2).min(Duration::from_secs(60));
                }
            }
            let _ = beat.send(runner.heartbeat());
        }
    }
}
