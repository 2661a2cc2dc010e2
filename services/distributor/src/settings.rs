use std::path::PathBuf;
use std::time::Duration;

use fleetcast_events::{PublicKey, TrustedKeys};
use fleetcast_package::ArchiveLimits;
use fleetcast_runtime::{NatsSettings, SettingsError};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub nats: NatsSettings,
    /// Public keys (base64, as `fleetcast keygen` writes them) whose signatures are accepted.
    pub trusted_keys: Vec<String>,
    /// Files holding such public keys.
    pub trusted_key_files: Vec<PathBuf>,
    pub work_dir: Option<PathBuf>,
    /// Chunks being checked, compressed or stored at once.
    pub concurrency: usize,
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    pub limits: ArchiveLimits,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            nats: NatsSettings::default(),
            trusted_keys: Vec::new(),
            trusted_key_files: Vec::new(),
            work_dir: None,
            concurrency: 32,
            ack_wait: Duration::from_secs(30),
            limits: ArchiveLimits::default(),
        }
    }
}

impl Settings {
    pub const LIST_KEYS: &'static [&'static str] = &["trusted_keys", "trusted_key_files"];

    pub fn validate(&self) -> Result<(), SettingsError> {
        let bad = |key: &str, reason: String| {
            Err(SettingsError::Value {
                key: key.into(),
                reason,
            })
        };
        if !(1..=1024).contains(&self.concurrency) {
            return bad("concurrency", "must be between 1 and 1024".into());
        }
        if self.ack_wait < Duration::from_secs(1) {
            return bad("ack_wait", "must be at least 1s".into());
        }
        self.trusted().map(|_| ())
    }

    /// The pinned keys, every one parsed; at least one is required.
    pub fn trusted(&self) -> Result<TrustedKeys, SettingsError> {
        let mut keys = Vec::new();
        for text in &self.trusted_keys {
            keys.push(
                PublicKey::from_text(text).map_err(|e| SettingsError::Value {
                    key: "trusted_keys".into(),
                    reason: e.to_string(),
                })?,
            );
        }
        for path in &self.trusted_key_files {
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
        Ok(TrustedKeys::new(keys))
    }

    pub fn work_dir(&self) -> PathBuf {
        self.work_dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}
