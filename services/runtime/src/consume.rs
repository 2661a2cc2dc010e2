//! The loop every event-driven service runs: a durable pull consumer shared by all instances of
//! the role (so several instances split the work like a queue group), explicit acks, progress
//! acks while a long job runs, and redelivery of whatever was not acked (crash, restart).

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::bus::BusError;

/// How long one pull waits on the server. A pull lost with a dead cluster node (the
/// consumer's leader) ends 5 s after this on the client's own timer, and the next pull reaches
/// the new leader; with the client's default (30 s) services stayed deaf for over half a
/// minute. The tracker's ordered report consumer, which has one replica, uses it too (its
/// idle heartbeat is half of it; two missed make the client replace the consumer).
pub const PULL_EXPIRES: Duration = Duration::from_secs(4);

/// What to do with a message once the handler is done with it.
#[derive(Debug)]
pub enum Outcome {
    /// Handled (including "rejected, with a rejected event published"): never deliver again.
    Done,
    /// A transient failure (NATS hiccup, store unavailable): deliver again after a delay.
    Retry(String),
    /// As `Retry`, after this delay (a backoff the handler computes, e.g. from the message's
    /// delivery count).
    RetryAfter(String, Duration),
}

#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub durable: &'static str,
    pub filter_subject: &'static str,
    /// A job not acked (nor marked in progress) within this time is handed to another instance.
    pub ack_wait: Duration,
}

/// Runs `handler` for every message until `shutdown`. A message is acked only after its handler
/// returned `Done`; while the handler runs, progress acks keep the message ours.
pub async fn run_consumer<F, Fut>(
    stream: &jetstream::stream::Stream,
    spec: ConsumerSpec,
    shutdown: CancellationToken,
    handler: F,
) -> Result<(), BusError>
where
    F: FnMut(jetstream::Message) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let setup = |e: &dyn std::fmt::Display| BusError::Setup {
        what: format!("consumer {}", spec.durable),
        reason: e.to_string(),
    };
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(
            spec.durable,
            pull::Config {
                durable_name: Some(spec.durable.into()),
                filter_subject: spec.filter_subject.into(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: spec.ack_wait,
                max_ack_pending: 64,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| setup(&e))?;
    run_consumer_on(consumer, shutdown, handler).await;
    Ok(())
}

/// As [`run_consumer`], on a durable consumer the caller created (with settings of its own:
/// several filter subjects, a deliver policy, one message in flight for strict order, …).
/// Its `ack_wait` paces the progress acks.
pub async fn run_consumer_on<F, Fut>(
    consumer: jetstream::consumer::Consumer<pull::Config>,
    shutdown: CancellationToken,
    mut handler: F,
) where
    F: FnMut(jetstream::Message) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let config = &consumer.cached_info().config;
    let durable = config.durable_name.clone().unwrap_or_default();
    let durable = durable.as_str();
    // The server fills in an ack_wait (30 s) when none was set; a zero would stop the ticker.
    let progress_every = (config.ack_wait / 3).max(Duration::from_millis(100));
    while !shutdown.is_cancelled() {
        // One message at a time, asked for only once the last one is done: none waits in this
        // instance's buffer, its ack_wait running, while a long job runs (another instance
        // takes it instead), and every pull goes to the consumer's current leader.
        let pull = consumer
            .batch()
            .max_messages(1)
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        let mut pull = match pull {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(durable, error = %e, "cannot pull, retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = pull.next() => next,
        };
        let message = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::debug!(durable, error = %e, "pull hiccup");
                continue;
            }
            // Nothing came within the pull's expiry: ask again.
            None => continue,
        };
        // The pull is over (one message); nothing more comes on its subscription.
        drop(pull);
        let acker = message.clone();
        let outcome = with_progress_acks(&acker, progress_every, handler(message)).await;
        settle(durable, &acker, outcome).await;
    }
}

/// Runs `job`, telling the server every `every` that its message is still being worked on, so
/// a long job (a large archive) is not redelivered to another instance meanwhile.
async fn with_progress_acks(
    acker: &jetstream::Message,
    every: Duration,
    job: impl Future<Output = Outcome>,
) -> Outcome {
    tokio::pin!(job);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            outcome = &mut job => return outcome,
            _ = ticker.tick() => {
                if let Err(e) = acker.ack_with(AckKind::Progress).await {
                    tracing::debug!(error = %e, "progress ack failed");
                }
            }
        }
    }
}

/// Acks a handled message (confirmed by the server), or naks it for a retry after a delay.
async fn settle(durable: &str, acker: &jetstream::Message, outcome: Outcome) {
    let ack = match outcome {
        Outcome::Done => acker.double_ack().await,
        Outcome::Retry(reason) => {
            tracing::warn!(durable, %reason, "will retry");
            acker
                .ack_with(AckKind::Nak(Some(Duration::from_secs(2))))
                .await
        }
        Outcome::RetryAfter(reason, delay) => {
            tracing::warn!(durable, %reason, retry_in = ?delay, "will retry");
            acker.ack_with(AckKind::Nak(Some(delay))).await
        }
    };
    if let Err(e) = ack {
        // Not fatal: the message is redelivered and handlers are idempotent.
        tracing::warn!(durable, error = %e, "ack failed");
    }
}

/// Decodes a consumed event according to its `Content-Type` header.
pub fn decode<T: serde::de::DeserializeOwned>(
    message: &jetstream::Message,
) -> Result<T, fleetcast_events::DecodeError> {
    decode_payload(message.headers.as_ref(), &message.payload)
}

pub use crate::bus::decode_payload;

/// The release a pipeline stage refuses: its app, version and archive.
pub struct RefusedRelease<'a> {
    pub app: &'a fleetcast_events::AppName,
    pub version: &'a semver::Version,
    pub blake3: &'a str,
    /// The incoming archive, removed once the refusal is recorded (nothing is kept for a
    /// refused package); `None` where it stays (the distributor's).
    pub archive: Option<&'a str>,
}

/// What a pipeline stage (the signer, the distributor) refuses releases with: where it records
/// them, where their archives are, where it announces them.
pub struct Refuser<'a> {
    pub stage: &'a str,
    pub bus: &'a crate::Bus,
    pub records: &'a crate::releases::Records,
    pub incoming: &'a crate::releases::Incoming,
}

/// Refuses `release` for `reason`: records it where its publisher looks
/// (`Records::record_rejection`; `of_signed` for a release that is signed already), removes its
/// archive, and publishes `release.rejected`, each step repeatable. `Outcome::Done` once the
/// event is out; retried if recording or publishing failed.
pub async fn reject_release(
    refuser: Refuser<'_>,
    release: RefusedRelease<'_>,
    reason: fleetcast_events::v1::Rejection,
    of_signed: bool,
) -> Outcome {
    let RefusedRelease {
        app,
        version,
        blake3,
        archive,
    } = release;
    let Refuser {
        stage,
        bus,
        records,
        incoming,
    } = refuser;
    tracing::warn!(%app, %version, code = %reason.code, reason = %reason.message, "release rejected");
    let recorded = records
        .record_rejection(app, version, Some(blake3), &reason, of_signed)
        .await;
    if let Err(e) = recorded {
        return Outcome::Retry(e.to_string());
    }
    if let Some(object) = archive
        && let Err(e) = incoming.delete(object).await
    {
        tracing::debug!(%object, error = %e, "rejected archive not deleted");
    }
    let rejected = fleetcast_events::v1::ReleaseRejected {
        app: app.clone(),
        version: version.clone(),
        stage: stage.into(),
        reason,
        blake3: Some(blake3.to_string()),
    };
    refusal_out(bus, fleetcast_events::names::RELEASE_REJECTED, &rejected).await
}

/// Publishes a refusal (JSON): done once it is out, retried otherwise.
async fn refusal_out<T: serde::Serialize>(bus: &crate::Bus, subject: &str, refusal: &T) -> Outcome {
    let published = bus
        .publish_event(subject, refusal, fleetcast_events::Encoding::Json, None)
        .await;
    match published {
        Ok(()) => Outcome::Done,
        Err(e) => Outcome::Retry(e.to_string()),
    }
}

/// Publishes `event_rejected` for a message that could not be decoded or broke the contract,
/// so the refusal is visible, then lets the message go: retrying a malformed event is pointless.
pub async fn reject_event(
    bus: &crate::Bus,
    stage: &str,
    subject: &str,
    reason: fleetcast_events::v1::Rejection,
) -> Outcome {
    tracing::warn!(%stage, %subject, code = %reason.code, reason = %reason.message, "event rejected");
    let event = fleetcast_events::v1::EventRejected {
        stage: stage.into(),
        subject: subject.into(),
        reason,
    };
    refusal_out(bus, fleetcast_events::names::EVENT_REJECTED, &event).await
}

/// Decodes an event, or refuses it with an `event_rejected` event. `Err` carries the outcome the
/// handler returns.
pub async fn decode_or_reject<T: serde::de::DeserializeOwned>(
    bus: &crate::Bus,
    stage: &str,
    message: &jetstream::Message,
) -> Result<T, Outcome> {
    match decode(message) {
        Ok(event) => Ok(event),
        Err(e) => {
            let reason = fleetcast_events::v1::Rejection {
                code: fleetcast_events::v1::RejectCode::InvalidEvent,
                message: e.to_string(),
            };
            Err(reject_event(bus, stage, &message.subject, reason).await)
        }
    }
}
