//! The agent's handle on the bus: exactly what a host needs, reached without any JetStream
//! management call. Every read is a direct get on a subject
//! (`$JS.API.DIRECT.GET.<stream>.<subject>`) and every announcement a plain subscription, so an
//! agent's credential needs neither stream info (which, given a subject filter, lists every
//! subject of a stream: every chunk hash, every app's desired-state keys) nor consumers, and its
//! permissions (`ops/nats/gen-accounts`, role `agent`) can name each subject it reads: its
//! apps' desired states, their chunks and tree nodes, the trust metadata. The fields are that list.

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use fleetcast_events::Encoding;
use fleetcast_events::names::{self, CHUNKS_STREAM, DESIRED_BUCKET, TRUST_BUCKET, chunk_subject};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError, connect};
use crate::settings::NatsSettings;

/// An agent's connection: its reads (direct gets, by subject) and its reports (core publishes
/// and requests on its own subjects).
#[derive(Clone)]
pub struct AgentBus {
    pub client: async_nats::Client,
    /// Desired version per app and ring: the agent reads `<app>.<ring>` of its apps.
    pub desired: DirectKv,
    /// Chunks and the nodes of release trees, under their app's subject.
    pub chunks: DirectChunks,
    /// Roots and the signer's timestamp.
    pub trust: DirectKv,
    /// How many times the client has connected (see [`Bus::connections`]).
    pub connections: watch::Receiver<u64>,
}

impl AgentBus {
    /// Connects (retrying with backoff until `shutdown`). Nothing is looked up on the server:
    /// a bucket or stream that does not exist yet makes its reads fail, and the agent's loops
    /// retry them.
    pub async fn connect(
        settings: &NatsSettings,
        name: &str,
        shutdown: &CancellationToken,
    ) -> Result<AgentBus, BusError> {
        let (client, connections) = Box::pin(connect(settings, name, shutdown)).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(settings.request_timeout)
            .build(client.clone());
        AgentBus::with(client, connections, &js).await
    }

    /// The same handles on a service's connection (tests, benchmarks, tools).
    pub async fn from_bus(bus: &Bus) -> Result<AgentBus, BusError> {
        AgentBus::with(bus.client.clone(), bus.connections.clone(), &bus.js).await
    }

    async fn with(
        client: async_nats::Client,
        connections: watch::Receiver<u64>,
        js: &jetstream::Context,
    ) -> Result<AgentBus, BusError> {
        Ok(AgentBus {
            desired: DirectKv::new(js, DESIRED_BUCKET).await?,
            chunks: DirectChunks::new(js).await?,
            trust: DirectKv::new(js, TRUST_BUCKET).await?,
            client,
            connections,
        })
    }

    /// Publishes a report (status, heartbeat) without waiting for an ack (see
    /// [`crate::bus::report_event`] for why).
    pub async fn report_event<T: Serialize>(
        &self,
        subject: &str,
        event: &T,
        encoding: Encoding,
    ) -> Result<(), BusError> {
        crate::bus::report_event(&self.client, subject, event, encoding).await
    }

    /// A core request carrying an event (see [`Bus::request_event`]).
    pub async fn request_event<T: Serialize, R: serde::de::DeserializeOwned>(
        &self,
        subject: &str,
        event: &T,
        encoding: Encoding,
    ) -> Result<R, BusError> {
        crate::bus::request_event(&self.client, subject, event, encoding).await
    }
}

/// A handle on a stream that never asked the server about it (no `STREAM.INFO`).
async fn no_info(js: &jetstream::Context, name: &str) -> Result<stream::Stream<()>, BusError> {
    js.get_stream_no_info(name)
        .await
        .map_err(|e| BusError::Setup {
            what: name.into(),
            reason: e.to_string(),
        })
}

/// One entry of a bucket as a direct get returns it.
#[derive(Debug, Clone)]
pub struct DirectEntry {
    pub value: Bytes,
    pub revision: u64,
    pub operation: kv::Operation,
}

/// Reads of a KV bucket by key, each a direct get of the key's subject: what `kv::Store`'s
/// `entry`/`get` do, without the `STREAM.INFO` a `kv::Store` is built from. Fleetcast's buckets
/// allow direct gets (async-nats creates them so).
#[derive(Clone)]
pub struct DirectKv {
    stream: stream::Stream<()>,
    prefix: String,
}

impl DirectKv {
    pub async fn new(js: &jetstream::Context, bucket: &str) -> Result<DirectKv, BusError> {
        Ok(DirectKv {
            stream: no_info(js, &format!("KV_{bucket}")).await?,
            prefix: format!("$KV.{bucket}."),
        })
    }

    /// The key's latest entry (a delete or purge included); `None` when it was never written.
    pub async fn entry(&self, key: &str) -> Result<Option<DirectEntry>, stream::DirectGetError> {
        match self
            .stream
            .direct_get_last_for_subject(format!("{}{key}", self.prefix))
            .await
        {
            Ok(message) => {
                // As async-nats reads it: the operation header, else a server marker, else a put.
                let operation = match message.headers.get(names::KV_OPERATION_HEADER) {
                    Some(op) => op.as_str().parse().unwrap_or(kv::Operation::Put),
                    None => match message
                        .headers
                        .get(async_nats::header::NATS_MARKER_REASON)
                        .map(|r| r.as_str())
                    {
                        Some("MaxAge" | "Purge") => kv::Operation::Purge,
                        Some("Remove") => kv::Operation::Delete,
                        _ => kv::Operation::Put,
                    },
                };
                Ok(Some(DirectEntry {
                    value: message.payload,
                    revision: message.sequence,
                    operation,
                }))
            }
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The key's value; `None` when it was never written or is deleted.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, stream::DirectGetError> {
        Ok(self
            .entry(key)
            .await?
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| e.value))
    }
}

/// Chunk reads: a direct get of `fleetcast.v1.chunk.<app>.<hash>`.
#[derive(Clone)]
pub struct DirectChunks {
    stream: stream::Stream<()>,
}

impl DirectChunks {
    pub async fn new(js: &jetstream::Context) -> Result<DirectChunks, BusError> {
        Ok(DirectChunks {
            stream: no_info(js, CHUNKS_STREAM).await?,
        })
    }

    /// The chunk as stored (compressed), or an error (`NotFound` when the app has none such).
    pub async fn get(
        &self,
        app: &str,
        chunk_hex: &str,
    ) -> Result<async_nats::jetstream::message::StreamMessage, stream::DirectGetError> {
        self.stream
            .direct_get_last_for_subject(chunk_subject(app, chunk_hex))
            .await
    }
}
