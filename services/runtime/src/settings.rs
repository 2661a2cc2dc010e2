//! Layered configuration: built-in defaults (the settings struct's `Default`) → an optional TOML
//! file → `FLEETCAST_<SERVICE>_*` environment variables (`__` separates nested keys, e.g.
//! `FLEETCAST_WATCHER_NATS__URL`). Settings structs use `deny_unknown_fields`, so a misspelt key
//! is an error, and serde's errors name the key at fault.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, de::DeserializeOwned};

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A value that parsed but is not acceptable (checked by the service's `validate`).
    #[error("invalid value for `{key}`: {reason}")]
    Value { key: String, reason: String },
}

/// The error a `validate` returns for an unacceptable value, naming its key.
pub fn invalid<T>(key: &str, reason: impl Into<String>) -> Result<T, SettingsError> {
    Err(SettingsError::Value {
        key: key.into(),
        reason: reason.into(),
    })
}

/// Loads settings for `service` (lowercase, e.g. "watcher"). `list_keys` name the keys whose
/// environment value is a comma-separated list (e.g. `trusted_keys`).
pub fn load_settings<T: DeserializeOwned>(
    service: &str,
    file: Option<&Path>,
    list_keys: &[&str],
) -> Result<T, SettingsError> {
    load_settings_from(service, file, list_keys, std::env::vars())
}

/// As [`load_settings`] with an explicit environment, so tests don't touch the process's own.
pub fn load_settings_from<T: DeserializeOwned>(
    service: &str,
    file: Option<&Path>,
    list_keys: &[&str],
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, SettingsError> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        if !path.is_file() {
            return Err(SettingsError::File {
                path: path.into(),
                reason: "not found".into(),
            });
        }
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    let prefix = format!("FLEETCAST_{}_", service.to_uppercase());
    let mut vars: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    // An empty list variable is an empty list (the parser would make it one empty string).
    let mut empty_lists = Vec::new();
    for key in list_keys {
        let var = format!("{prefix}{}", key.to_uppercase().replace('.', "__"));
        if vars.get(&var).is_some_and(|v| v.trim().is_empty()) {
            vars.remove(&var);
            empty_lists.push(*key);
        }
    }
    let mut environment =
        config::Environment::with_prefix(&format!("FLEETCAST_{}", service.to_uppercase()))
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(Some(vars));
    if !list_keys.is_empty() {
        environment = environment.list_separator(",");
        for key in list_keys {
            environment = environment.with_list_parse_key(key);
        }
    }
    builder = builder.add_source(environment);
    for key in empty_lists {
        builder = builder
            .set_override(key, Vec::<String>::new())
            .map_err(|e| SettingsError::Invalid(e.to_string()))?;
    }
    let merged = builder.build().map_err(|e| match file {
        Some(path) => SettingsError::File {
            path: path.into(),
            reason: e.to_string(),
        },
        None => SettingsError::Invalid(e.to_string()),
    })?;
    merged
        .try_deserialize()
        .map_err(|e| SettingsError::Invalid(e.to_string()))
}

/// How a service reaches NATS.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// Comma-separated server URLs, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// Optional `.creds` file (JWT + nkey) for this service's identity.
    pub credentials: Option<PathBuf>,
    /// How long one request (KV get, direct get, publish ack) may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// TLS for the NATS connection: set, the client accepts only a TLS connection to a server
    /// whose certificate chains to `ca_file`, and presents its own certificate if given.
    pub tls: Option<TlsSettings>,
    /// JetStream replicas of the streams and buckets this service creates when they do not
    /// exist yet: 1 on a single server, 3 on a cluster (a server can then fail without losing
    /// or stopping anything). Existing ones keep theirs.
    pub replicas: usize,
    /// Prefix of this client's reply subjects (default `_INBOX`). An agent whose NATS identity
    /// may read only its own replies uses `_INBOX.<agent id>` (see `ops/nats/gen-accounts`).
    pub inbox_prefix: Option<String>,
    /// Connect without `credentials` or without `tls` (an unauthenticated or unencrypted
    /// connection): for local development on 127.0.0.1 only. Off, the connection is refused
    /// unless both are set, so a deployment that forgot them fails at start instead of
    /// running open.
    pub insecure_dev: bool,
    /// Size limits of the streams and buckets this service creates (`[nats.quotas]`).
    pub quotas: StoreQuotas,
}

impl Default for NatsSettings {
    fn default() -> Self {
        NatsSettings {
            url: "nats://127.0.0.1:4222".into(),
            credentials: None,
            tls: None,
            request_timeout: Duration::from_secs(10),
            replicas: 1,
            inbox_prefix: None,
            insecure_dev: false,
            quotas: StoreQuotas::default(),
        }
    }
}

impl NatsSettings {
    /// What is missing for an authenticated, encrypted connection (`None`: nothing).
    pub fn missing_security(&self) -> Option<&'static str> {
        match (self.credentials.is_some(), self.tls.is_some()) {
            (true, true) => None,
            (false, true) => Some("no nats.credentials"),
            (true, false) => Some("no nats.tls.ca_file"),
            (false, false) => Some("no nats.credentials and no nats.tls.ca_file"),
        }
    }
}

/// Size limits (bytes) of the streams and buckets fleetcast creates. JetStream reserves each
/// `*_bytes` on every server holding a replica when it creates the stream, and refuses to
/// create one it cannot reserve (its `max_file_store`, by default 75% of the free disk, or the
/// account's `disk_storage`): size them to the servers' disks. They apply when a stream is
/// created; existing streams keep theirs (change them with `nats stream edit`, see
/// docs/operations.md, "Quotas").
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreQuotas {
    /// The chunk store (FLEETCAST_CHUNKS): every stored version of every app, deduplicated
    /// within each app. Full, the distributor's stores fail (retried, reported) until an
    /// operator makes room.
    pub chunks_bytes: i64,
    /// Archives waiting to be signed and chunked (the `fleetcast-incoming` object store); the
    /// largest archive CI can upload is bounded by it too.
    pub incoming_bytes: i64,
    /// How long an archive may wait in the incoming store: one uploaded but never named by an
    /// event that decodes (a publisher that died between upload and announce) is removed after
    /// this. A release still waiting this long for the signer or a distributor is refused
    /// then (`archive_mismatch`, not in the store).
    #[serde(with = "humantime_serde")]
    pub incoming_max_age: Duration,
    /// The release pipeline's events (FLEETCAST_RELEASES), besides their 90-day age limit.
    pub releases_stream_bytes: i64,
    /// Agents' reports (FLEETCAST_STATUS), besides their 7-day age limit: oldest dropped first.
    pub status_stream_bytes: i64,
    /// The largest report the status stream takes (heartbeat, status).
    pub status_message_bytes: i32,
    /// Each KV bucket holding records (releases, index, desired, rollouts): they grow with
    /// every release stored.
    pub record_bucket_bytes: i64,
    /// Each of the other KV buckets (fleet, signer, trust).
    pub bucket_bytes: i64,
    /// The largest event of the releases stream and value of the buckets that hold a signed
    /// manifest or a chunk index (releases, index, desired) or a rollout (its failures, one per
    /// host): at most the server's `max_payload`.
    pub record_bytes: i32,
    /// The largest value of the other buckets (fleet, signer, trust).
    pub state_bytes: i32,
}

impl Default for StoreQuotas {
    fn default() -> Self {
        StoreQuotas {
            chunks_bytes: 4 << 30,
            incoming_bytes: 2 << 30,
            incoming_max_age: Duration::from_secs(7 * 24 * 3600),
            releases_stream_bytes: 256 << 20,
            status_stream_bytes: 256 << 20,
            status_message_bytes: 64 << 10,
            record_bucket_bytes: 512 << 20,
            bucket_bytes: 128 << 20,
            record_bytes: 8 << 20,
            state_bytes: 1 << 20,
        }
    }
}

/// TLS of a NATS connection (`[nats.tls]`), the same for every fleetcast program.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file with the CA certificate(s) the server's certificate must chain to.
    pub ca_file: PathBuf,
    /// PEM files with this client's certificate and its key, for servers that verify clients
    /// (`verify: true` in nats-server's `tls` block). Both or neither.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// The pinned public keys of a verifier's settings (`trusted_keys` inline, base64, and
/// `trusted_key_files`), every one parsed; at least one is required.
pub fn trusted_keys(
    texts: &[String],
    files: &[PathBuf],
) -> Result<fleetcast_events::TrustedKeys, SettingsError> {
    use fleetcast_events::PublicKey;
    let mut keys = Vec::new();
    for text in texts {
        let key = PublicKey::from_text(text).map_err(|e| SettingsError::Value {
            key: "trusted_keys".into(),
            reason: e.to_string(),
        })?;
        keys.push(key);
    }
    for path in files {
        let err = |reason: String| SettingsError::Value {
            key: "trusted_key_files".into(),
            reason: format!("{}: {reason}", path.display()),
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        keys.push(PublicKey::from_text(&text).map_err(|e| err(e.to_string()))?);
    }
    if keys.is_empty() {
        return Err(SettingsError::Value {
            key: "trusted_keys".into(),
            reason: "at least one trusted public key is required".into(),
        });
    }
    Ok(fleetcast_events::TrustedKeys::new(keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Demo {
        nats: NatsSettings,
        drop_dir: PathBuf,
        max_entries: u64,
    }

    impl Default for Demo {
        fn default() -> Self {
            Demo {
                nats: NatsSettings::default(),
                drop_dir: "drop".into(),
                max_entries: 10,
            }
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_then_file_then_environment() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("demo.toml");
        std::fs::write(
            &file,
            "drop_dir = \"/srv/drop\"\nmax_entries = 5\n[nats]\nurl = \"nats://a:1\"\n",
        )
        .expect("write");
        let s: Demo = load_settings_from("demo", None, &[], env(&[])).expect("defaults");
        assert_eq!(s, Demo::default());
        // Closed by default: no unauthenticated, unencrypted connection unless asked for.
        assert!(!s.nats.insecure_dev);
        let s: Demo = load_settings_from(
            "demo",
            Some(&file),
            &[],
            env(&[
                ("FLEETCAST_DEMO_MAX_ENTRIES", "7"),
                ("FLEETCAST_DEMO_NATS__REQUEST_TIMEOUT", "3s"),
                ("FLEETCAST_DEMO_NATS__INSECURE_DEV", "true"),
            ]),
        )
        .expect("layered");
        assert_eq!(s.drop_dir, PathBuf::from("/srv/drop"));
        assert_eq!(s.max_entries, 7);
        assert_eq!(s.nats.url, "nats://a:1");
        assert_eq!(s.nats.request_timeout, Duration::from_secs(3));
        assert!(s.nats.insecure_dev);
    }

    #[test]
    fn list_variables_split_on_commas_and_empty_means_none() {
        #[derive(Debug, Deserialize, Default)]
        #[serde(deny_unknown_fields, default)]
        struct Lists {
            apps: Vec<String>,
        }
        let apps = |value: &str| {
            load_settings_from::<Lists>(
                "demo",
                None,
                &["apps"],
                env(&[("FLEETCAST_DEMO_APPS", value)]),
            )
            .expect("lists")
            .apps
        };
        assert_eq!(apps("a,b"), vec!["a", "b"]);
        assert!(apps("").is_empty());
        assert!(apps(" ").is_empty());
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e =
            load_settings_from::<Demo>("demo", None, &[], env(&[("FLEETCAST_DEMO_DROP_DRI", "x")]))
                .expect_err("unknown key");
        assert!(e.to_string().contains("drop_dri"), "{e}");
        let e = load_settings_from::<Demo>(
            "demo",
            None,
            &[],
            env(&[("FLEETCAST_DEMO_MAX_ENTRIES", "many")]),
        )
        .expect_err("bad value");
        assert!(e.to_string().contains("max_entries"), "{e}");
        let e =
            load_settings_from::<Demo>("demo", Some(Path::new("/nonexistent.toml")), &[], env(&[]))
                .expect_err("missing file");
        assert!(e.to_string().contains("nonexistent"), "{e}");
    }
}
