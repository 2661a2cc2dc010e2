//! The NATS connection and the JetStream resources every service uses, created idempotently so
//! any service can start first.

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream};
use async_nats::{ConnectOptions, HeaderMap};
use fleetcast_events::names::*;
use fleetcast_events::{CONTENT_TYPE, Encoding};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::settings::NatsSettings;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("shut down before NATS was reachable")]
    Cancelled,
    #[error("cannot set up {what}: {reason}")]
    Setup { what: String, reason: String },
    #[error("cannot encode event for {subject}: {reason}")]
    Encode { subject: String, reason: String },
    #[error("cannot publish to {subject}: {reason}")]
    Publish { subject: String, reason: String },
    /// A request nobody answered (no responders, timeout) or whose reply does not decode.
    #[error("no usable answer on {subject}: {reason}")]
    Request { subject: String, reason: String },
}

/// A connected client with handles to every stream, bucket and store.
#[derive(Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub releases_stream: stream::Stream,
    pub chunks: stream::Stream,
    pub status_stream: stream::Stream,
    pub releases: kv::Store,
    pub index: kv::Store,
    pub signer_state: kv::Store,
    pub desired: kv::Store,
    pub fleet: kv::Store,
    pub rollouts: kv::Store,
    pub incoming: object_store::ObjectStore,
    /// How many times the client has connected: it changes on every reconnect, after which
    /// a core subscription's holder re-reads what it may have missed while disconnected.
    pub connections: watch::Receiver<u64>,
}

/// Largest chunk as stored (a 256 KiB chunk that zstd could not shrink, plus its frame).
const MAX_CHUNK_MESSAGE: i32 = 300 * 1024;

impl Bus {
    /// Connects (retrying with backoff until `shutdown`) and ensures every resource exists.
    pub async fn connect(
        settings: &NatsSettings,
        name: &str,
        shutdown: &CancellationToken,
    ) -> Result<Bus, BusError> {
        let (client, connections) = connect(settings, name, shutdown).await?;
        let mut delay = Duration::from_millis(200);
        loop {
            // Boxed: setting up every stream and bucket is a large future, and callers' own
            // futures (tests' included) should not carry it on their stacks.
            match Box::pin(Bus::ensure(client.clone(), connections.clone(), settings)).await {
                Ok(bus) => return Ok(bus),
                Err(e) => {
                    tracing::warn!(error = %e, "JetStream not ready, retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(BusError::Cancelled),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    pub async fn ensure(
        client: async_nats::Client,
        connections: watch::Receiver<u64>,
        settings: &NatsSettings,
    ) -> Result<Bus, BusError> {
        let js = jetstream::ContextBuilder::new()
            .timeout(settings.request_timeout)
            .build(client.clone());
        let setup = |what: &str| {
            let what = what.to_string();
            move |e: Box<dyn std::error::Error + Send + Sync>| BusError::Setup {
                what,
                reason: e.to_string(),
            }
        };
        let releases_stream = js
            .get_or_create_stream(stream::Config {
                name: RELEASES_STREAM.into(),
                subjects: RELEASES_STREAM_SUBJECTS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                max_age: Duration::from_secs(90 * 24 * 3600),
                duplicate_window: Duration::from_secs(300),
                storage: stream::StorageType::File,
                num_replicas: settings.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| setup(RELEASES_STREAM)(e.into()))?;
        let chunks = js
            .get_or_create_stream(stream::Config {
                name: CHUNKS_STREAM.into(),
                subjects: vec![format!("{CHUNK_SUBJECT_PREFIX}*")],
                // A chunk is immutable and named by its content: one message per subject.
                max_messages_per_subject: 1,
                max_message_size: MAX_CHUNK_MESSAGE,
                allow_direct: true,
                storage: stream::StorageType::File,
                num_replicas: settings.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| setup(CHUNKS_STREAM)(e.into()))?;
        let status_stream = js
            .get_or_create_stream(stream::Config {
                name: STATUS_STREAM.into(),
                subjects: STATUS_STREAM_SUBJECTS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                max_age: Duration::from_secs(7 * 24 * 3600),
                storage: stream::StorageType::File,
                num_replicas: settings.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| setup(STATUS_STREAM)(e.into()))?;
        let releases = kv_bucket(&js, RELEASES_BUCKET, 10, settings.replicas).await?;
        let index = kv_bucket(&js, INDEX_BUCKET, 1, settings.replicas).await?;
        let signer_state = kv_bucket(&js, SIGNER_BUCKET, 10, settings.replicas).await?;
        let desired = kv_bucket(&js, DESIRED_BUCKET, 10, settings.replicas).await?;
        allow_consumers(&js, DESIRED_BUCKET, DESIRED_WATCHERS).await?;
        let fleet = kv_bucket(&js, FLEET_BUCKET, 1, settings.replicas).await?;
        let rollouts = kv_bucket(&js, ROLLOUTS_BUCKET, 10, settings.replicas).await?;
        let incoming = match js.get_object_store(INCOMING_BUCKET).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: INCOMING_BUCKET.into(),
                    description: Some("release archives waiting to be signed and chunked".into()),
                    storage: stream::StorageType::File,
                    num_replicas: settings.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| setup(INCOMING_BUCKET)(e.into()))?,
        };
        Ok(Bus {
            client,
            js,
            releases_stream,
            chunks,
            status_stream,
            releases,
            index,
            signer_state,
            desired,
            fleet,
            rollouts,
            incoming,
            connections,
        })
    }

    /// Publishes an event to JetStream and waits for the stream's ack. `msg_id` makes the publish
    /// idempotent within the stream's duplicate window (a retried handler publishes once).
    /// A core NATS request carrying an event (content type in its header); the reply is
    /// decoded by its own content type (JSON when it names none).
    pub async fn request_event<T: Serialize, R: serde::de::DeserializeOwned>(
        &self,
        subject: &str,
        event: &T,
        encoding: Encoding,
    ) -> Result<R, BusError> {
        let fail = |reason: String| BusError::Request {
            subject: subject.into(),
            reason,
        };
        let (headers, payload) = encode_event(subject, event, encoding)?;
        let reply = self
            .client
            .request_with_headers(subject.to_string(), headers, payload.into())
            .await
            .map_err(|e| fail(e.to_string()))?;
        crate::consume::decode_payload(reply.headers.as_ref(), &reply.payload)
            .map_err(|e| fail(format!("reply does not decode: {e}")))
    }

    pub async fn publish_event<T: Serialize>(
        &self,
        subject: &str,
        event: &T,
        encoding: Encoding,
        msg_id: Option<&str>,
    ) -> Result<(), BusError> {
        let (headers, payload) = encode_event(subject, event, encoding)?;
        let mut msg = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .headers(headers);
        if let Some(id) = msg_id {
            msg = msg.message_id(id);
        }
        let fail = |e: &dyn std::fmt::Display| BusError::Publish {
            subject: subject.into(),
            reason: e.to_string(),
        };
        self.js
            .send_publish(subject.to_string(), msg)
            .await
            .map_err(|e| fail(&e))?
            .await
            .map_err(|e| fail(&e))?;
        Ok(())
    }
}

/// An event's payload and the headers naming its encoding.
fn encode_event<T: Serialize>(
    subject: &str,
    event: &T,
    encoding: Encoding,
) -> Result<(HeaderMap, Vec<u8>), BusError> {
    let payload = encoding.encode(event).map_err(|e| BusError::Encode {
        subject: subject.into(),
        reason: e.to_string(),
    })?;
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, encoding.content_type());
    Ok((headers, payload))
}

/// Every agent watches its desired-state key: one ordered consumer each on the bucket's stream.
/// nats-server 2.15 caps a stream at 1,000 consumers unless the stream says otherwise, which a
/// fleet passes quickly, so the bucket says how many it needs.
const DESIRED_WATCHERS: i32 = 1_000_000;

async fn allow_consumers(
    js: &jetstream::Context,
    bucket: &str,
    consumers: i32,
) -> Result<(), BusError> {
    let fail = |e: &dyn std::fmt::Display| BusError::Setup {
        what: format!("{bucket} consumer limit"),
        reason: e.to_string(),
    };
    let mut stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|e| fail(&e))?;
    let mut config = stream.info().await.map_err(|e| fail(&e))?.config.clone();
    if config.max_consumers >= consumers {
        return Ok(());
    }
    config.max_consumers = consumers;
    js.update_stream(config).await.map_err(|e| fail(&e))?;
    Ok(())
}

async fn kv_bucket(
    js: &jetstream::Context,
    bucket: &str,
    history: i64,
    replicas: usize,
) -> Result<kv::Store, BusError> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: bucket.into(),
        history,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| BusError::Setup {
        what: bucket.into(),
        reason: e.to_string(),
    })
}

/// Connects with unlimited reconnects; connection changes are logged, never fatal. The
/// receiver counts connections (see [`Bus::connections`]).
pub async fn connect(
    settings: &NatsSettings,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<(async_nats::Client, watch::Receiver<u64>), BusError> {
    let mut delay = Duration::from_millis(200);
    let (count, connections) = watch::channel(0u64);
    let count = std::sync::Arc::new(count);
    loop {
        let count = count.clone();
        let mut options = ConnectOptions::new()
            .name(name)
            .max_reconnects(None)
            .request_timeout(Some(settings.request_timeout))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(2_000))
            })
            .event_callback(move |event| {
                let count = count.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("connected to NATS");
                            count.send_modify(|n| *n += 1);
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!("disconnected from NATS, reconnecting")
                        }
                        async_nats::Event::Closed => tracing::debug!("NATS connection closed"),
                        other => tracing::warn!(event = %other, "NATS connection event"),
                    }
                }
            });
        if let Some(creds) = &settings.credentials {
            options = options
                .credentials_file(creds)
                .await
                .map_err(|e| BusError::Connect {
                    url: settings.url.clone(),
                    reason: format!("credentials {}: {e}", creds.display()),
                })?;
        }
        match options.connect(settings.url.as_str()).await {
            Ok(client) => return Ok((client, connections)),
            Err(e) => {
                tracing::warn!(url = %settings.url, error = %e, "NATS not reachable yet, retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(BusError::Cancelled),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
