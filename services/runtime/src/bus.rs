//! The NATS connection and the JetStream resources every service uses, created idempotently so
//! any service can start first.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
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
    /// Neither credentials and TLS nor `insecure_dev`: the connection would be open to anyone.
    #[error(
        "refusing to connect to NATS at {url} without authentication and TLS ({missing}): set \
         nats.credentials and nats.tls.ca_file (docs/operations.md, \"NATS permissions\"), or, \
         for local development on 127.0.0.1 only, nats.insecure_dev = true \
         (FLEETCAST_<SERVICE>_NATS__INSECURE_DEV=true; the CLI: --nats-insecure-dev)"
    )]
    Insecure { url: String, missing: &'static str },
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

/// A connection to NATS: the client, its JetStream context and who it is. Each role binds the
/// streams, buckets and stores it uses into a handle of its own (the signer's `SignerBus`, the
/// agent's [`AgentBus`](crate::AgentBus), …), so what a role does not use it never looks up,
/// and its NATS permissions need not allow it.
#[derive(Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    /// The NATS user this connection authenticates as (its credentials' name), which the
    /// server lets publish on its own subjects only (`names::tracker_command_subject`, …);
    /// [`names::UNAUTHENTICATED`] without credentials (insecure development mode).
    pub user: String,
    /// How many times the client has connected: it changes on every reconnect, after which
    /// a core subscription's holder re-reads what it may have missed while disconnected.
    pub connections: watch::Receiver<u64>,
}

/// A role's handle on the bus: its connection and what it binds of the streams, buckets and
/// stores (the signer's `SignerBus`, …). Bound once at start ([`Bus::bind`] waits until they
/// exist); a role that does not bind a stream needs no permission to look it up.
pub trait Role: Sized {
    fn bind(bus: &Bus) -> impl std::future::Future<Output = Result<Self, BusError>> + Send;
}

/// Lets a role's handle (a struct with a `bus: Bus` field) be used where its connection is:
/// publishing, requests, refusals. `bus_role!(Role => Handle)`: its `bus` field is another
/// role's handle (e.g. [`crate::releases::PipelineBus`]) whose parts it shares, and through
/// which it reaches the connection.
#[macro_export]
macro_rules! bus_role {
    ($role:ty) => {
        $crate::bus_role!($role => $crate::Bus);
    };
    ($role:ty => $handle:ty) => {
        impl ::std::ops::Deref for $role {
            type Target = $handle;
            fn deref(&self) -> &$handle {
                &self.bus
            }
        }
    };
}

/// Largest chunk as stored (a 256 KiB chunk that zstd could not shrink, plus its frame).
const MAX_CHUNK_MESSAGE: i32 = 300 * 1024;

/// Largest message of the incoming object store: an archive's chunk (`ARCHIVE_CHUNK_SIZE` in
/// `releases.rs`, 512 KiB; older uploads used async-nats's 128 KiB) or an object's metadata.
const MAX_OBJECT_MESSAGE: i32 = 1 << 20;

/// A KV bucket fleetcast creates.
struct BucketSpec {
    name: &'static str,
    history: i64,
    replicas: usize,
    max_bytes: i64,
    max_value_size: i32,
    /// Where the server republishes every write of its keys (prefix + key; see
    /// [`DESIRED_SUBJECT_PREFIX`] for why).
    republish: Option<&'static str>,
}

impl Bus {
    /// Connects (retrying with backoff until `shutdown`) and creates every stream and bucket
    /// that does not exist yet, with `settings.replicas`: what the fleetcast services do, so
    /// that any of them can start first.
    pub async fn connect(
        settings: &NatsSettings,
        name: &str,
        shutdown: &CancellationToken,
    ) -> Result<Bus, BusError> {
        let bus = Bus::attach(settings, name, shutdown).await?;
        // Boxed: setting up every stream and bucket is a large future, and callers' own
        // futures (tests' included) should not carry it on their stacks.
        bus.bind(shutdown, || Box::pin(provision(&bus.js, settings)))
            .await?;
        Ok(bus)
    }

    /// Connects without creating anything: what agents and the CLI do. They bind what they
    /// use ([`Bus::bind`] waits until a service has created it) and never create a stream or
    /// bucket, so none ends up with their defaults (a single replica on a cluster), and their
    /// credentials need no right to.
    pub async fn attach(
        settings: &NatsSettings,
        name: &str,
        shutdown: &CancellationToken,
    ) -> Result<Bus, BusError> {
        let user = match &settings.credentials {
            Some(path) => credentials_user(path).map_err(|e| BusError::Connect {
                url: settings.url.clone(),
                reason: e.to_string(),
            })?,
            None => UNAUTHENTICATED.to_string(),
        };
        // Boxed: async-nats's connect is a large future.
        let (client, connections) = Box::pin(connect(settings, name, shutdown)).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(settings.request_timeout)
            .build(client.clone());
        Ok(Bus {
            client,
            js,
            user,
            connections,
        })
    }

    /// Runs `bind` (a role binding its handles, or a service setting up the store) until it
    /// succeeds, retrying with backoff until `shutdown`: JetStream may not be ready yet, or a
    /// stream not created yet by the service that creates it.
    pub async fn bind<T, F, Fut>(
        &self,
        shutdown: &CancellationToken,
        bind: F,
    ) -> Result<T, BusError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, BusError>>,
    {
        let mut delays = crate::retry::delays(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match bind().await {
                Ok(bound) => return Ok(bound),
                Err(e) => {
                    tracing::warn!(error = %e, "JetStream not ready, retrying");
                    let delay = delays.next().unwrap_or_default();
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(BusError::Cancelled),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// A stream a service created (see [`names`]).
    pub async fn stream(&self, name: &str) -> Result<stream::Stream, BusError> {
        self.js
            .get_stream(name)
            .await
            .map_err(|e| not_set_up(name, &e))
    }

    /// A KV bucket a service created (see [`names`]).
    pub async fn bucket(&self, name: &str) -> Result<kv::Store, BusError> {
        self.js
            .get_key_value(name)
            .await
            .map_err(|e| not_set_up(name, &e))
    }

    /// A core NATS request carrying an event (content type in its header); the reply is
    /// decoded by its own content type (JSON when it names none).
    pub async fn request_event<T: Serialize, R: serde::de::DeserializeOwned>(
        &self,
        subject: &str,
        event: &T,
        encoding: Encoding,
    ) -> Result<R, BusError> {
        request_event(&self.client, subject, event, encoding).await
    }

    /// Publishes an event to JetStream and waits for the stream's ack. `msg_id` makes the publish
    /// idempotent within the stream's duplicate window (a retried handler publishes once).
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

/// Publishes a report without waiting for the stream's ack: what agents send about themselves
/// (status, heartbeats; [`AgentBus::report_event`](crate::AgentBus::report_event)). The stream
/// captures it all the same; a lost one is not sent again in any case (the next heartbeat says
/// it all again), so waiting for an ack per report would only cost a round trip and, across a
/// fleet announced to at once, a server reply per host.
pub(crate) async fn report_event<T: Serialize>(
    client: &async_nats::Client,
    subject: &str,
    event: &T,
    encoding: Encoding,
) -> Result<(), BusError> {
    let (headers, payload) = encode_event(subject, event, encoding)?;
    client
        .publish_with_headers(subject.to_string(), headers, payload.into())
        .await
        .map_err(|e| BusError::Publish {
            subject: subject.into(),
            reason: e.to_string(),
        })
}

/// See [`Bus::request_event`].
pub(crate) async fn request_event<T: Serialize, R: serde::de::DeserializeOwned>(
    client: &async_nats::Client,
    subject: &str,
    event: &T,
    encoding: Encoding,
) -> Result<R, BusError> {
    let fail = |reason: String| BusError::Request {
        subject: subject.into(),
        reason,
    };
    let (headers, payload) = encode_event(subject, event, encoding)?;
    let reply = client
        .request_with_headers(subject.to_string(), headers, payload.into())
        .await
        .map_err(|e| fail(e.to_string()))?;
    decode_payload(reply.headers.as_ref(), &reply.payload)
        .map_err(|e| fail(format!("reply does not decode: {e}")))
}

/// Decodes any NATS payload (a reply, a core message) by the `Content-Type` in its headers;
/// JSON when there is none.
pub fn decode_payload<T: serde::de::DeserializeOwned>(
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> Result<T, fleetcast_events::DecodeError> {
    let content_type = headers
        .and_then(|h| h.get(fleetcast_events::CONTENT_TYPE))
        .map(|v| v.as_str().to_string());
    fleetcast_events::codec::decode(content_type.as_deref(), payload)
}

/// An event's payload and the headers naming its encoding.
pub(crate) fn encode_event<T: Serialize>(
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

/// The streams fleetcast creates: the release events, the chunks, the agents' reports.
fn streams(settings: &NatsSettings) -> [stream::Config; 3] {
    let quotas = &settings.quotas;
    let subjects = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
    let releases = stream::Config {
        name: RELEASES_STREAM.into(),
        subjects: subjects(&RELEASES_STREAM_SUBJECTS),
        max_age: Duration::from_secs(90 * 24 * 3600),
        max_bytes: quotas.releases_stream_bytes,
        max_message_size: quotas.record_bytes,
        duplicate_window: Duration::from_secs(300),
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        ..Default::default()
    };
    let chunks = stream::Config {
        name: CHUNKS_STREAM.into(),
        subjects: vec![CHUNKS_STREAM_SUBJECTS.into()],
        // A chunk is immutable and named by its app and content: one message per subject.
        max_messages_per_subject: 1,
        max_message_size: MAX_CHUNK_MESSAGE,
        max_bytes: quotas.chunks_bytes,
        // Full: new chunks are refused (the release is not stored), never old ones dropped
        // from under the releases that use them.
        discard: stream::DiscardPolicy::New,
        allow_direct: true,
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        ..Default::default()
    };
    let status = stream::Config {
        name: STATUS_STREAM.into(),
        subjects: subjects(&STATUS_STREAM_SUBJECTS),
        max_age: Duration::from_secs(7 * 24 * 3600),
        // Full before a week: the oldest reports go first (the tracker's inventory holds what
        // they said).
        max_bytes: quotas.status_stream_bytes,
        max_message_size: quotas.status_message_bytes,
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        ..Default::default()
    };
    [releases, chunks, status]
}

/// The KV buckets fleetcast creates: release records, the signer's state, desired states, the
/// inventory, rollouts, trust. Buckets holding a signed manifest, and the rollouts (a failure
/// reason per host), take records up to `record_bytes`; the others hold small state.
fn buckets(settings: &NatsSettings) -> [BucketSpec; 6] {
    let quotas = &settings.quotas;
    let bucket = |name: &'static str, history: i64, record: bool| BucketSpec {
        name,
        history,
        replicas: settings.replicas,
        max_bytes: if record {
            quotas.record_bucket_bytes
        } else {
            quotas.bucket_bytes
        },
        max_value_size: if record {
            quotas.record_bytes
        } else {
            quotas.state_bytes
        },
        republish: None,
    };
    [
        bucket(RELEASES_BUCKET, 10, true),
        bucket(SIGNER_BUCKET, 10, false),
        BucketSpec {
            republish: Some(DESIRED_SUBJECT_PREFIX),
            ..bucket(DESIRED_BUCKET, 10, true)
        },
        bucket(FLEET_BUCKET, 1, false),
        bucket(ROLLOUTS_BUCKET, 10, true),
        BucketSpec {
            republish: Some(TRUST_SUBJECT_PREFIX),
            ..bucket(TRUST_BUCKET, 1, false)
        },
    ]
}

/// The incoming object store's own stream (as async-nats's `create_object_store` makes it),
/// made here so it gets a largest message size and the incoming quotas too, which that call
/// does not set.
fn incoming_stream(settings: &NatsSettings) -> stream::Config {
    let quotas = &settings.quotas;
    stream::Config {
        name: format!("OBJ_{INCOMING_BUCKET}"),
        description: Some("release archives waiting to be signed and chunked".into()),
        subjects: vec![
            format!("$O.{INCOMING_BUCKET}.C.>"),
            format!("$O.{INCOMING_BUCKET}.M.>"),
        ],
        max_bytes: quotas.incoming_bytes,
        max_age: quotas.incoming_max_age,
        max_message_size: MAX_OBJECT_MESSAGE,
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        allow_direct: true,
        ..Default::default()
    }
}

/// Creates every stream, bucket and store that does not exist yet ([`streams`], [`buckets`],
/// [`incoming_stream`]), and brings older ones up to date (chunk subjects, republishing).
async fn provision(js: &jetstream::Context, settings: &NatsSettings) -> Result<(), BusError> {
    let [releases, chunks, status] = streams(settings);
    create_stream(js, releases).await?;
    let chunks = create_stream(js, chunks).await?;
    widen_chunk_subjects(js, &chunks).await;
    create_stream(js, status).await?;
    for spec in buckets(settings) {
        kv_bucket(js, spec).await?;
    }
    if js.get_object_store(INCOMING_BUCKET).await.is_err() {
        create_stream(js, incoming_stream(settings)).await?;
    }
    Ok(())
}

pub(crate) fn not_set_up(what: &str, e: &dyn std::fmt::Display) -> BusError {
    BusError::Setup {
        what: what.into(),
        reason: format!("not set up yet (a fleetcast service creates it): {e}"),
    }
}

async fn create_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, BusError> {
    let name = config.name.clone();
    js.get_or_create_stream(config)
        .await
        .map_err(|e| BusError::Setup {
            what: name,
            reason: e.to_string(),
        })
}

/// Looks up a KV bucket, or creates it when missing, with its republish setting when it has
/// one (added to a bucket made before fleetcast set it).
async fn kv_bucket(js: &jetstream::Context, spec: BucketSpec) -> Result<kv::Store, BusError> {
    let bucket = spec.name;
    let republish = spec.republish.map(|prefix| stream::Republish {
        source: format!("$KV.{bucket}.>"),
        destination: format!("{prefix}>"),
        headers_only: false,
    });
    if let Ok(store) = js.get_key_value(bucket).await {
        if let Some(republish) = republish {
            add_republish(js, &store, republish).await;
        }
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: bucket.into(),
        history: spec.history,
        storage: stream::StorageType::File,
        num_replicas: spec.replicas,
        max_bytes: spec.max_bytes,
        max_value_size: spec.max_value_size,
        republish,
        ..Default::default()
    })
    .await
    .map_err(|e| BusError::Setup {
        what: bucket.into(),
        reason: e.to_string(),
    })
}

/// Adds the republish setting to a bucket made before fleetcast set it. Only the roles that
/// write the bucket may update its stream (the tracker the desired states, the signer the
/// trust); for the others a refusal is only logged.
async fn add_republish(js: &jetstream::Context, store: &kv::Store, republish: stream::Republish) {
    // As the lookup just read it.
    let config = store.stream.cached_info().config.clone();
    if config.republish.as_ref() == Some(&republish) {
        return;
    }
    let updated = stream::Config {
        republish: Some(republish),
        ..config
    };
    match js.update_stream(&updated).await {
        Ok(_) => tracing::info!(bucket = %store.name, "bucket now republishes its writes"),
        Err(e) => tracing::warn!(
            bucket = %store.name,
            error = %e,
            "the bucket does not republish its writes yet (agents behind a leaf node learn of them only when they read); the tracker or signer adds it when it starts"
        ),
    }
}

/// The user name a `.creds` file authenticates as: the `name` claim of its user JWT, which
/// the server's permission templates (`{{name()}}`) use, so it is the name the server lets
/// this connection publish under.
fn credentials_user(path: &std::path::Path) -> Result<String, CredentialsError> {
    use base64::Engine;
    let unreadable = |reason: &str| CredentialsError {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let text = std::fs::read_to_string(path).map_err(|e| unreadable(&e.to_string()))?;
    let jwt = text
        .lines()
        .skip_while(|l| !l.contains("BEGIN NATS USER JWT"))
        .nth(1)
        .map(str::trim)
        .ok_or_else(|| unreadable("holds no user JWT"))?;
    let claims = jwt
        .split('.')
        .nth(1)
        .and_then(|part| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part.trim_end_matches('='))
                .ok()
        })
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .ok_or_else(|| unreadable("the user JWT does not decode"))?;
    let name = claims
        .get("name")
        .and_then(|n| n.as_str())
        .ok_or_else(|| unreadable("the user JWT names no user"))?;
    validate_user_name(name).map_err(|e| unreadable(&e.to_string()))?;
    Ok(name.to_string())
}

/// A credentials file that names no usable user.
#[derive(Debug, thiserror::Error)]
#[error("credentials {}: {reason}", path.display())]
struct CredentialsError {
    path: std::path::PathBuf,
    reason: String,
}

/// Refuses a connection without credentials and TLS unless `insecure_dev` is on, and then says
/// loudly what it is: every service, the agent and the CLI connect through [`connect`], so no
/// deployment can forget its credentials and still run.
fn check_secure(settings: &NatsSettings, name: &str) -> Result<(), BusError> {
    let Some(missing) = settings.missing_security() else {
        return Ok(());
    };
    if !settings.insecure_dev {
        return Err(BusError::Insecure {
            url: settings.url.clone(),
            missing,
        });
    }
    tracing::warn!(
        url = %settings.url,
        client = name,
        missing,
        "INSECURE DEVELOPMENT MODE (nats.insecure_dev): this NATS connection is unauthenticated \
         or unencrypted; for local development on 127.0.0.1 only, never in production"
    );
    Ok(())
}

/// A chunks stream made before chunks were stored per app captures `fleetcast.v1.chunk.*`
/// only: it is widened to [`CHUNKS_STREAM_SUBJECTS`] (which still holds the old subjects), else
/// no per-app chunk could be stored. Only the distributor may update it; for the others a
/// refusal is only logged.
async fn widen_chunk_subjects(js: &jetstream::Context, chunks: &stream::Stream) {
    let config = chunks.cached_info().config.clone();
    if config.subjects == [CHUNKS_STREAM_SUBJECTS] {
        return;
    }
    let updated = stream::Config {
        subjects: vec![CHUNKS_STREAM_SUBJECTS.into()],
        ..config
    };
    match js.update_stream(&updated).await {
        Ok(_) => tracing::info!(
            stream = CHUNKS_STREAM,
            "chunk store now takes chunks per app"
        ),
        Err(e) => tracing::warn!(
            stream = CHUNKS_STREAM,
            error = %e,
            "the chunk store does not take per-app chunks yet; the distributor widens it when it starts (docs/operations.md, Upgrading)"
        ),
    }
}

/// Connects with unlimited reconnects; connection changes are logged, never fatal. The
/// receiver counts connections (see [`Bus::connections`]).
pub async fn connect(
    settings: &NatsSettings,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<(async_nats::Client, watch::Receiver<u64>), BusError> {
    let servers = server_addrs(settings)?;
    check_secure(settings, name)?;
    let mut delays = crate::retry::delays(Duration::from_millis(200), Duration::from_secs(5));
    let (count, connections) = watch::channel(0u64);
    let count = std::sync::Arc::new(count);
    loop {
        let options = connect_options(settings, name, count.clone()).await?;
        match options.connect(servers.as_slice()).await {
            Ok(client) => return Ok((client, connections)),
            Err(e) => {
                tracing::warn!(url = %settings.url, error = %e, "NATS not reachable yet, retrying");
                let delay = delays.next().unwrap_or_default();
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(BusError::Cancelled),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// The servers of `nats.url`: several (a cluster's nodes) as a comma-separated list, which the
/// client tries in turn, learning the rest of the cluster from the one it reaches.
fn server_addrs(settings: &NatsSettings) -> Result<Vec<async_nats::ServerAddr>, BusError> {
    let fail = |reason: String| BusError::Connect {
        url: settings.url.clone(),
        reason,
    };
    let servers = settings
        .url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| u.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    if servers.is_empty() {
        return Err(fail("no server URL".into()));
    }
    Ok(servers)
}

/// The client's options: reconnecting for ever, counting connections into `count`, with the
/// settings' inbox prefix, TLS and credentials.
async fn connect_options(
    settings: &NatsSettings,
    name: &str,
    count: std::sync::Arc<watch::Sender<u64>>,
) -> Result<ConnectOptions, BusError> {
    let fail = |reason: String| BusError::Connect {
        url: settings.url.clone(),
        reason,
    };
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
    if let Some(prefix) = &settings.inbox_prefix {
        options = options.custom_inbox_prefix(prefix);
    }
    if let Some(tls) = &settings.tls {
        options = options
            .require_tls(true)
            .add_root_certificates(tls.ca_file.clone());
        match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => {
                options = options.add_client_certificate(cert.clone(), key.clone())
            }
            (None, None) => {}
            _ => return Err(fail("nats.tls: cert_file and key_file go together".into())),
        }
    }
    if let Some(creds) = &settings.credentials {
        options = options
            .credentials_file(creds)
            .await
            .map_err(|e| fail(format!("credentials {}: {e}", creds.display())))?;
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::TlsSettings;

    #[test]
    fn every_store_has_the_deployments_replicas_and_a_size_limit() {
        let settings = NatsSettings {
            replicas: 3,
            ..Default::default()
        };
        let streams = streams(&settings)
            .into_iter()
            .chain([incoming_stream(&settings)]);
        for config in streams {
            assert_eq!(config.num_replicas, 3, "{}", config.name);
            assert!(config.max_bytes > 0, "{}", config.name);
            assert!(config.max_message_size > 0, "{}", config.name);
        }
        let buckets = buckets(&settings);
        for spec in &buckets {
            assert_eq!(spec.replicas, 3, "{}", spec.name);
            assert!(
                spec.max_bytes > 0 && spec.max_value_size > 0,
                "{}",
                spec.name
            );
        }
        // Agents learn of writes to these two by subscription (leaf nodes included).
        let republished: Vec<_> = buckets
            .iter()
            .filter(|b| b.republish.is_some())
            .map(|b| b.name)
            .collect();
        assert_eq!(republished, [DESIRED_BUCKET, TRUST_BUCKET]);
    }

    #[test]
    fn a_full_chunk_store_refuses_new_chunks_and_keeps_the_old() {
        let [_, chunks, _] = streams(&NatsSettings::default());
        assert_eq!(chunks.discard, stream::DiscardPolicy::New);
        assert_eq!(chunks.max_messages_per_subject, 1);
        assert!(chunks.allow_direct, "agents read chunks by direct get");
    }

    /// No server is needed: the refusal comes before any connection attempt.
    #[tokio::test]
    async fn without_credentials_and_tls_a_connection_is_refused_unless_insecure_dev() {
        let shutdown = CancellationToken::new();
        // Port 1: nothing listens there, so an attempt would only retry.
        let open = NatsSettings {
            url: "nats://127.0.0.1:1".into(),
            ..Default::default()
        };
        let Err(e) = connect(&open, "test", &shutdown).await else {
            panic!("refused");
        };
        assert!(matches!(e, BusError::Insecure { .. }), "{e}");
        let text = e.to_string();
        for named in ["nats.credentials", "nats.tls.ca_file", "nats.insecure_dev"] {
            assert!(text.contains(named), "{text}");
        }

        // Credentials alone (or TLS alone) are not enough.
        let creds_only = NatsSettings {
            credentials: Some("/nonexistent.creds".into()),
            ..open.clone()
        };
        let Err(e) = connect(&creds_only, "test", &shutdown).await else {
            panic!("refused");
        };
        assert!(
            e.to_string().contains("no nats.tls.ca_file")
                && !e.to_string().contains("no nats.credentials"),
            "{e}"
        );
        let tls_only = NatsSettings {
            tls: Some(TlsSettings {
                ca_file: "/nonexistent.pem".into(),
                cert_file: None,
                key_file: None,
            }),
            ..open.clone()
        };
        let Err(e) = connect(&tls_only, "test", &shutdown).await else {
            panic!("refused");
        };
        assert!(e.to_string().contains("no nats.credentials"), "{e}");

        // insecure_dev lets it try: it gets as far as retrying an unreachable server, and
        // returns only when shut down.
        let dev = NatsSettings {
            insecure_dev: true,
            ..open
        };
        shutdown.cancel();
        let Err(e) = connect(&dev, "test", &shutdown).await else {
            panic!("cancelled");
        };
        assert!(matches!(e, BusError::Cancelled), "{e}");
    }
}
