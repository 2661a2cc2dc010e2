//! Webhooks: history entries forwarded to HTTP receivers (a chat, a pager), each request signed.
//!
//! Each `[[webhooks]]` entry is a durable pull consumer of the history stream
//! (`webhook-<name>`, [`names::webhook_consumer`]) filtered on its kinds and apps. A new one
//! starts with the entries recorded after it was created (`DeliverPolicy::New`: nothing from
//! before the webhook was configured); after that it goes on from where it was, across tracker
//! restarts. One entry is in flight at a time, so a receiver gets them in order. An entry is
//! acked once the receiver answered 2xx; while the receiver fails (no connection, no answer
//! within 10 s, 5xx, 3xx, 408, 429) the entry is delivered again after 1 s, 2 s, 4 s, … at most
//! 5 min apart, for as long as it takes. Any other 4xx is the receiver refusing the entry: it
//! is logged, counted and acked, not sent again.
//!
//! A request is a POST of the entry's JSON (as stored) with `X-Fleetcast-Delivery` (the
//! entry's stream sequence: a redelivered entry has the same, receivers dedupe on it),
//! `X-Fleetcast-Timestamp` (unix seconds of this attempt) and `X-Fleetcast-Signature`
//! (`sha256=` and the hex HMAC-SHA256 of `<timestamp>.<body>` keyed with the webhook's
//! secret), as GitHub and Stripe sign theirs. docs/operations.md shows how to verify it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull};
use bytes::Bytes;
use fleetcast_events::AppName;
use fleetcast_events::names::{self, HISTORY_STREAM, HISTORY_SUBJECT_PREFIX};
use fleetcast_events::v1::HistoryKind;
use fleetcast_runtime::consume::{Outcome, run_consumer_on};
use fleetcast_runtime::metrics::CounterFamily;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::Full;
use hyper::http::uri::InvalidUri;
use hyper::{StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use serde::Deserialize;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::service::Tracker;

/// What a webhook forwards unless its `kinds` say otherwise: how rollouts start, progress and
/// end, hosts that rolled back or were replaced, releases refused.
pub const DEFAULT_KINDS: [HistoryKind; 9] = [
    HistoryKind::RolloutStarted,
    HistoryKind::RingCompleted,
    HistoryKind::RolloutHalted,
    HistoryKind::RolloutCompleted,
    HistoryKind::RolloutAborted,
    HistoryKind::HostRolledBack,
    HistoryKind::HostReplaced,
    HistoryKind::ReleaseRejected,
    HistoryKind::PackageRejected,
];

/// A receiver that has not answered within this is counted as failed (and tried again).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The first retry's delay; each next one doubles, up to [`RETRY_MAX`].
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// An entry not acked within this is delivered again (a tracker that died mid-request): longer
/// than a request may take.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// The server deletes a webhook's consumer unused for this long (a webhook removed from the
/// settings), so one added again much later starts afresh rather than replaying everything
/// recorded meanwhile. Only the tracker writes the history: while it is stopped (its webhooks
/// unused) nothing new is recorded.
const CONSUMER_INACTIVE: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_NAME_LEN: usize = 64;

/// One `[[webhooks]]` entry of the tracker's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Letters, digits, `-` and `_`: it names the webhook's consumer, logs and metrics.
    pub name: String,
    /// Where entries are POSTed: `http://` or `https://` (the system's CA roots).
    pub url: String,
    /// The file holding the HMAC key the requests are signed with (whitespace around it, such
    /// as a final newline, is not part of it).
    pub secret_file: PathBuf,
    /// The history kinds forwarded (`rollout.halted`, …); default [`DEFAULT_KINDS`].
    #[serde(default = "default_kinds")]
    pub kinds: Vec<HistoryKind>,
    /// Only entries about these apps; empty: every app's (and those about no app).
    #[serde(default)]
    pub apps: Vec<AppName>,
}

fn default_kinds() -> Vec<HistoryKind> {
    DEFAULT_KINDS.to_vec()
}

/// Why a `[[webhooks]]` entry is refused (the tracker does not start); each names the webhook.
#[derive(Debug, thiserror::Error)]
pub enum InvalidWebhook {
    #[error("name {0:?}: 1 to {MAX_NAME_LEN} letters, digits, '-' or '_'")]
    Name(String),
    #[error("{name}: url is not a URL: {cause}")]
    NotAUrl { name: String, cause: InvalidUri },
    #[error("{name}: url must start with http:// or https://")]
    Scheme { name: String },
    #[error("{name}: url has no host")]
    NoHost { name: String },
    #[error("{name}: secret_file is required (the HMAC key requests are signed with)")]
    NoSecretFile { name: String },
    #[error("{name}: kinds is empty, the webhook would get nothing (leave it out for the default)")]
    NoKinds { name: String },
    #[error("{name}: two webhooks have this name")]
    NameTwice { name: String },
}

impl WebhookSettings {
    fn validate(&self) -> Result<(), InvalidWebhook> {
        let name = &self.name;
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(InvalidWebhook::Name(name.clone()));
        }
        let name = || name.clone();
        let uri: Uri = self.url.parse().map_err(|cause| InvalidWebhook::NotAUrl {
            name: name(),
            cause,
        })?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(InvalidWebhook::Scheme { name: name() });
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(InvalidWebhook::NoHost { name: name() });
        }
        if self.secret_file.as_os_str().is_empty() {
            return Err(InvalidWebhook::NoSecretFile { name: name() });
        }
        if self.kinds.is_empty() {
            return Err(InvalidWebhook::NoKinds { name: name() });
        }
        Ok(())
    }

    /// The history subjects the webhook's consumer follows: every kind of every app asked for.
    pub fn filter_subjects(&self) -> Vec<String> {
        let kinds: BTreeSet<String> = self.kinds.iter().map(ToString::to_string).collect();
        let apps: BTreeSet<&str> = if self.apps.is_empty() {
            BTreeSet::from(["*"])
        } else {
            self.apps.iter().map(AppName::as_str).collect()
        };
        apps.iter()
            .flat_map(|app| {
                kinds
                    .iter()
                    .map(move |kind| format!("{HISTORY_SUBJECT_PREFIX}{app}.{kind}"))
            })
            .collect()
    }

    /// The receiver as logs name it: scheme, host and port, never the path or query (a chat's
    /// incoming-webhook URL carries its token there).
    fn target(&self) -> String {
        match self.url.parse::<Uri>() {
            Ok(uri) => format!(
                "{}://{}{}",
                uri.scheme_str().unwrap_or("?"),
                uri.host().unwrap_or("?"),
                uri.port().map(|p| format!(":{p}")).unwrap_or_default()
            ),
            Err(_) => "?".into(),
        }
    }
}

/// Checks every webhook of the settings (see `[[webhooks]]` in docs/operations.md).
pub fn validate_all(hooks: &[WebhookSettings]) -> Result<(), InvalidWebhook> {
    let mut seen = BTreeSet::new();
    for hook in hooks {
        hook.validate()?;
        if !seen.insert(hook.name.as_str()) {
            return Err(InvalidWebhook::NameTwice {
                name: hook.name.clone(),
            });
        }
    }
    Ok(())
}

/// Why a webhook's secret file cannot be used: it names the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the secret file {}: {cause}", path.display())]
    Unreadable {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("the secret file {} is empty", path.display())]
    Empty { path: PathBuf },
}

/// The secret in `path`, without the whitespace around it; an error if it cannot be read or
/// is empty.
pub fn load_secret(path: &std::path::Path) -> Result<Vec<u8>, SecretError> {
    let bytes = std::fs::read(path).map_err(|cause| SecretError::Unreadable {
        path: path.to_path_buf(),
        cause,
    })?;
    let secret = bytes.trim_ascii();
    if secret.is_empty() {
        return Err(SecretError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(secret.to_vec())
}

/// The hex HMAC-SHA256 of `<timestamp>.<body>` keyed with `secret` (the signature header
/// carries it after `sha256=`).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length: this cannot fail.
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What became of one attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// 2xx: done.
    Delivered(StatusCode),
    /// A 4xx other than 408 and 429: the receiver will never take this entry.
    Refused(StatusCode),
    /// Anything else (and no answer at all): try again later.
    Failed(String),
}

/// The answer a receiver's status means.
pub fn judge(status: StatusCode) -> Answer {
    if status.is_success() {
        Answer::Delivered(status)
    } else if status.is_client_error()
        && status != StatusCode::REQUEST_TIMEOUT
        && status != StatusCode::TOO_MANY_REQUESTS
    {
        Answer::Refused(status)
    } else {
        Answer::Failed(format!("HTTP {status}"))
    }
}

/// How long to wait before delivering an entry again after its `delivered`-th attempt failed.
pub fn retry_delay(delivered: i64) -> Duration {
    let doublings = delivered.saturating_sub(1).clamp(0, 16) as u32;
    RETRY_FIRST.saturating_mul(1 << doublings).min(RETRY_MAX)
}

/// Deliveries per webhook and outcome, for `/metrics`.
pub fn deliveries_counter(
    registry: &mut prometheus_client::registry::Registry,
    hooks: &[WebhookSettings],
) -> CounterFamily<2> {
    let outcomes = ["delivered", "failed", "refused"];
    let series: Vec<[&str; 2]> = hooks
        .iter()
        .flat_map(|h| outcomes.iter().map(|o| [h.name.as_str(), *o]))
        .collect();
    CounterFamily::new(
        registry,
        "fleetcast_tracker_webhook_deliveries_total",
        "Attempts to deliver a history entry to each webhook, by outcome (delivered: 2xx; failed: no answer, 5xx, 3xx, 408 or 429, tried again later; refused: another 4xx, not tried again).",
        ["webhook", "outcome"],
    )
    .starting_at_zero(&series)
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A webhook ready to forward: its settings, its secret read, its URL parsed.
pub struct Webhook {
    pub settings: WebhookSettings,
    secret: Vec<u8>,
    uri: Uri,
    target: String,
    client: HttpClient,
}

impl std::fmt::Debug for Webhook {
    /// Without the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.settings.name)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// Why the webhooks cannot forward: the tracker does not start (a secret, TLS), or one
/// webhook stops (its consumer).
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhooks: cannot load the system's CA certificates: {0}")]
    CaRoots(std::io::Error),
    #[error("webhooks: TLS: {0}")]
    Tls(rustls::Error),
    #[error("webhook {webhook}: {cause}")]
    Secret { webhook: String, cause: SecretError },
    #[error("webhook {webhook}: url: {cause}")]
    Url { webhook: String, cause: InvalidUri },
    #[error("webhook {webhook}: no history stream: {cause}")]
    NoHistory {
        webhook: String,
        cause: jetstream::context::GetStreamError,
    },
    #[error("webhook {webhook}: cannot set up consumer {consumer}: {cause}")]
    Consumer {
        webhook: String,
        consumer: String,
        cause: jetstream::stream::ConsumerError,
    },
}

/// The settings' webhooks with their secrets read (validated settings): an error for a secret
/// that cannot be read or is empty, or no CA roots for HTTPS.
pub fn prepare(hooks: &[WebhookSettings]) -> Result<Vec<Arc<Webhook>>, WebhookError> {
    if hooks.is_empty() {
        return Ok(Vec::new());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let https_used = hooks.iter().any(|h| {
        h.url
            .parse::<Uri>()
            .is_ok_and(|u| u.scheme_str() == Some("https"))
    });
    let builder = if https_used {
        builder
            .with_provider_and_native_roots(provider)
            .map_err(WebhookError::CaRoots)?
    } else {
        // Plain HTTP only: no CA roots needed (a machine may have none).
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(WebhookError::Tls)?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        builder.with_tls_config(tls)
    };
    let https = builder.https_or_http().enable_http1().build();
    let client: HttpClient = Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
    hooks
        .iter()
        .map(|settings| {
            let webhook = || settings.name.clone();
            let secret =
                load_secret(&settings.secret_file).map_err(|cause| WebhookError::Secret {
                    webhook: webhook(),
                    cause,
                })?;
            let uri = settings.url.parse().map_err(|cause| WebhookError::Url {
                webhook: webhook(),
                cause,
            })?;
            Ok(Arc::new(Webhook {
                target: settings.target(),
                settings: settings.clone(),
                secret,
                uri,
                client: client.clone(),
            }))
        })
        .collect()
}

impl Webhook {
    /// One attempt at delivering `body` (an entry's JSON) as delivery `delivery`, signed for
    /// `timestamp` (unix seconds).
    pub async fn post(&self, delivery: u64, body: Bytes, timestamp: i64) -> Answer {
        let signature = format!("sha256={}", sign(&self.secret, timestamp, &body));
        let request = hyper::Request::post(self.uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("fleetcast-tracker/", env!("CARGO_PKG_VERSION")),
            )
            .header("x-fleetcast-delivery", delivery.to_string())
            .header("x-fleetcast-timestamp", timestamp.to_string())
            .header("x-fleetcast-signature", signature)
            .body(Full::new(body));
        let request = match request {
            Ok(r) => r,
            Err(e) => return Answer::Failed(format!("cannot build the request: {e}")),
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(request)).await {
            Ok(Ok(response)) => judge(response.status()),
            Ok(Err(e)) => Answer::Failed(error_chain(&e)),
            Err(_) => Answer::Failed(format!("no answer within {REQUEST_TIMEOUT:?}")),
        }
    }

    /// Delivers one entry of the history stream and says what to do with it.
    #[tracing::instrument(skip_all, fields(webhook = %self.settings.name, target = %self.target))]
    async fn handle(&self, deliveries: &CounterFamily<2>, msg: jetstream::Message) -> Outcome {
        let name = self.settings.name.as_str();
        let (delivery, delivered) = match msg.info() {
            Ok(info) => (info.stream_sequence, info.delivered),
            Err(e) => {
                tracing::warn!(error = %e, "a history message without metadata; skipped");
                return Outcome::Done;
            }
        };
        let now = OffsetDateTime::now_utc().unix_timestamp();
        match self.post(delivery, msg.payload.clone(), now).await {
            Answer::Delivered(status) => {
                deliveries.inc(&[name, "delivered"]);
                tracing::info!(delivery, subject = %msg.subject, %status, "history entry delivered");
                Outcome::Done
            }
            Answer::Refused(status) => {
                deliveries.inc(&[name, "refused"]);
                tracing::warn!(delivery, subject = %msg.subject, %status, "the receiver refused the history entry; it is not sent again");
                Outcome::Done
            }
            Answer::Failed(reason) => {
                deliveries.inc(&[name, "failed"]);
                Outcome::RetryAfter(
                    format!(
                        "webhook {name} ({}), delivery {delivery} ({}), attempt {delivered}: {reason}",
                        self.target, msg.subject
                    ),
                    retry_delay(delivered),
                )
            }
        }
    }
}

/// `e` and its sources, so "client error (Connect)" says why (connection refused, TLS, …).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Forwards `hook`'s entries until `shutdown`: makes (or brings to its settings) its consumer
/// of the history stream, then delivers entry after entry.
pub async fn forward(
    tracker: Arc<Tracker>,
    hook: Arc<Webhook>,
    shutdown: CancellationToken,
) -> Result<(), WebhookError> {
    let name = names::webhook_consumer(&hook.settings.name);
    let webhook = || hook.settings.name.clone();
    let stream = tracker
        .bus
        .js
        .get_stream(HISTORY_STREAM)
        .await
        .map_err(|cause| WebhookError::NoHistory {
            webhook: webhook(),
            cause,
        })?;
    // Create or update: a changed `kinds` or `apps` applies to the consumer made before; the
    // deliver policy of one that exists stays (it goes on from where it was).
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!(
                "the tracker's webhook {} ({})",
                hook.settings.name, hook.target
            )),
            filter_subjects: hook.settings.filter_subjects(),
            deliver_policy: DeliverPolicy::New,
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            // One at a time: an entry waiting for its retry holds back the later ones, so
            // the receiver gets them in order.
            max_ack_pending: 1,
            max_deliver: -1,
            inactive_threshold: CONSUMER_INACTIVE,
            ..Default::default()
        })
        .await
        .map_err(|cause| WebhookError::Consumer {
            webhook: webhook(),
            consumer: name.clone(),
            cause,
        })?;
    tracing::info!(webhook = %hook.settings.name, target = %hook.target, subjects = %hook.settings.filter_subjects().join(" "), "forwarding history entries");
    run_consumer_on(consumer, shutdown, move |msg| {
        let (tracker, hook) = (tracker.clone(), hook.clone());
        async move { hook.handle(&tracker.webhook_deliveries, msg).await }
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first webhook of `toml`, parsed and checked; why not, in words.
    fn hook(toml: &str) -> Result<WebhookSettings, Box<dyn std::error::Error>> {
        #[derive(Deserialize)]
        struct Wrap {
            webhooks: Vec<WebhookSettings>,
        }
        let w: Wrap = toml::from_str(toml)?;
        validate_all(&w.webhooks)?;
        w.webhooks.into_iter().next().ok_or_else(|| "none".into())
    }

    const OK: &str = r#"
        [[webhooks]]
        name = "pager_1"
        url = "https://hooks.example.com/T000/B000/secret-token"
        secret_file = "/run/secrets/pager"
    "#;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        const BODY: &[u8] = br#"{"kind":"rollout.halted"}"#;
        // python3 -c 'import hmac,hashlib; print(hmac.new(b"whsec_test",
        //   b"1700000000.{\"kind\":\"rollout.halted\"}", hashlib.sha256).hexdigest())'
        let signed = sign(b"whsec_test", 1_700_000_000, BODY);
        assert_eq!(
            signed,
            "021d184b9ee4249c1ab8427e8ff87c6e25933449d32f46a2e78f5af5eaef5f9d"
        );
        // Another timestamp or secret: another signature (a replayed body with a new time
        // does not verify).
        assert_ne!(sign(b"whsec_test", 1_700_000_001, BODY), signed);
        assert_ne!(sign(b"whsec_other", 1_700_000_000, BODY), signed);
    }

    #[test]
    fn a_webhook_gets_the_default_kinds_of_every_app_unless_told() {
        let h = hook(OK).expect("valid");
        assert_eq!(h.kinds, DEFAULT_KINDS);
        let subjects = h.filter_subjects();
        assert_eq!(subjects.len(), DEFAULT_KINDS.len());
        assert!(subjects.contains(&"fleetcast.v1.history.*.rollout.halted".to_string()));
        assert!(subjects.contains(&"fleetcast.v1.history.*.package.rejected".to_string()));

        let h = hook(&format!(
            "{OK}\nkinds = [\"rollout.halted\", \"host.rolled_back\"]\napps = [\"web\", \"api\"]"
        ))
        .expect("valid");
        assert_eq!(
            h.filter_subjects(),
            [
                "fleetcast.v1.history.api.host.rolled_back",
                "fleetcast.v1.history.api.rollout.halted",
                "fleetcast.v1.history.web.host.rolled_back",
                "fleetcast.v1.history.web.rollout.halted",
            ]
        );
        // Logs name the receiver without its path (a token may be in it).
        assert_eq!(h.target(), "https://hooks.example.com");
    }

    #[test]
    fn invalid_webhooks_are_refused_with_what_is_wrong() {
        let cases = [
            (OK.replace("pager_1", "pager 1"), "letters, digits"),
            (OK.replace("pager_1", ""), "letters, digits"),
            (OK.replace("pager_1", "pager.1"), "letters, digits"),
            (OK.replace("https://", "ftp://"), "http:// or https://"),
            (
                OK.replace(
                    "https://hooks.example.com/T000/B000/secret-token",
                    "not a url",
                ),
                "url",
            ),
            (
                OK.replace(
                    "https://hooks.example.com/T000/B000/secret-token",
                    "/just/a/path",
                ),
                "http:// or https://",
            ),
            (
                OK.replace("\"/run/secrets/pager\"", "\"\""),
                "secret_file is required",
            ),
            (format!("{OK}\nkinds = []"), "kinds is empty"),
            (
                format!("{OK}\nkinds = [\"rollout.exploded\"]"),
                "unknown variant",
            ),
            (format!("{OK}\napps = [\"a.b\"]"), "apps"),
            (format!("{OK}\ncolour = \"red\""), "unknown field"),
            (format!("{OK}\n{OK}"), "two webhooks have this name"),
            (
                OK.replace("secret_file = \"/run/secrets/pager\"", ""),
                "missing field `secret_file`",
            ),
        ];
        for (toml, why) in cases {
            let err = hook(&toml).expect_err(&toml).to_string();
            assert!(err.contains(why), "{toml}: {err} (expected {why:?})");
        }
        // The tracker's settings check them, naming the key.
        let mut bad = hook(OK).expect("valid");
        bad.url = "ftp://example.com".into();
        let settings = crate::Settings {
            webhooks: vec![bad],
            ..Default::default()
        };
        let err = settings.validate().expect_err("refused").to_string();
        assert!(
            err.contains("`webhooks`") && err.contains("pager_1: url must start"),
            "{err}"
        );
    }

    #[test]
    fn the_tracker_refuses_a_webhook_whose_secret_it_cannot_read() {
        let dir = tempfile::tempdir().expect("tmp");
        let missing = dir.path().join("missing");
        let err = load_secret(&missing).expect_err("missing");
        assert!(
            matches!(&err, SecretError::Unreadable { cause, .. } if cause.kind() == std::io::ErrorKind::NotFound),
            "{err}"
        );
        assert!(
            err.to_string().contains("cannot read the secret file"),
            "{err}"
        );
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n  \n").expect("write");
        let err = load_secret(&empty).expect_err("empty");
        assert!(matches!(err, SecretError::Empty { .. }), "{err}");
        assert!(err.to_string().contains("is empty"), "{err}");
        let good = dir.path().join("good");
        std::fs::write(&good, "s3cret\n").expect("write");
        assert_eq!(load_secret(&good).expect("read"), b"s3cret");

        let mut settings: WebhookSettings = hook(OK).expect("valid");
        settings.secret_file = empty;
        let err = prepare(&[settings.clone()]).expect_err("refused");
        assert!(err.to_string().starts_with("webhook pager_1: "), "{err}");
        settings.secret_file = good;
        settings.url = "http://127.0.0.1:9/hook".into();
        let ready = prepare(&[settings]).expect("ready");
        assert_eq!(ready[0].secret, b"s3cret");
        // Debug output (logs) never shows the secret.
        assert!(!format!("{:?}", ready[0]).contains("s3cret"));
    }

    #[test]
    fn receivers_answers_are_judged_as_documented() {
        for ok in [200, 201, 202, 204] {
            let s = StatusCode::from_u16(ok).expect("status");
            assert_eq!(judge(s), Answer::Delivered(s));
        }
        for refused in [400, 401, 403, 404, 410, 413, 422] {
            let s = StatusCode::from_u16(refused).expect("status");
            assert_eq!(judge(s), Answer::Refused(s));
        }
        for retried in [301, 302, 408, 429, 500, 502, 503, 504] {
            let s = StatusCode::from_u16(retried).expect("status");
            assert!(matches!(judge(s), Answer::Failed(_)), "{retried}");
        }
    }

    #[test]
    fn retries_wait_twice_as_long_each_time_up_to_five_minutes() {
        let delays: Vec<u64> = (1..=12).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(retry_delay(0), RETRY_FIRST);
        assert_eq!(retry_delay(i64::MAX), RETRY_MAX);
    }
}
