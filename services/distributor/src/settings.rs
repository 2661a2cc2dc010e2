use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fleetcast_package::ArchiveLimits;
use fleetcast_runtime::settings::invalid;
use fleetcast_runtime::{NatsSettings, SettingsError, Trust};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub nats: NatsSettings,
    /// The first root of trust (`fleetcast root`); rotations are followed from there. Or:
    pub trusted_root_file: Option<PathBuf>,
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
    /// `GET /health` and `GET /metrics` (Prometheus) are served here: default
    /// `127.0.0.1:8433` (the tracker has 8430, the watcher 8431, the signer 8432). In a
    /// container, `0.0.0.0:8433` lets Prometheus reach it; port 0 takes any free port.
    pub metrics_listen: SocketAddr,
    /// Serve `/health` and `/metrics` over HTTPS with this certificate and key (PEM), for when
    /// `metrics_listen` is reachable from other machines.
    pub metrics_tls: Option<fleetcast_runtime::https::HttpsSettings>,
    /// Binary patches for rebuilt files (`[patches]`).
    pub patches: PatchSettings,
}

/// Which files get binary patches, and how hard the distributor works on them. A patch is made
/// in memory: the two files plus zstd's tables (310 MB in all for two 46 MiB builds at level
/// 19), so `max_file_bytes` bounds the distributor's memory while it patches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PatchSettings {
    /// Make patches when the tracker asks (after each stored release).
    pub enabled: bool,
    /// Smaller files cost little as chunks: no patch.
    pub min_file_bytes: u64,
    pub max_file_bytes: u64,
    /// zstd level (1 to 22).
    pub level: i32,
    /// At most this many base versions per release (the tracker names the most run first).
    pub max_bases: usize,
}

impl Default for PatchSettings {
    fn default() -> Self {
        PatchSettings {
            enabled: true,
            min_file_bytes: 64 * 1024,
            max_file_bytes: 64 << 20,
            level: fleetcast_package::patch::PATCH_LEVEL,
            max_bases: 3,
        }
    }
}

fleetcast_runtime::endpoint_settings!(Settings);

impl Default for Settings {
    fn default() -> Self {
        Settings {
            nats: NatsSettings::default(),
            trusted_root_file: None,
            trusted_keys: Vec::new(),
            trusted_key_files: Vec::new(),
            work_dir: None,
            concurrency: 32,
            ack_wait: Duration::from_secs(30),
            limits: ArchiveLimits::default(),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 8433)),
            metrics_tls: None,
            patches: PatchSettings::default(),
        }
    }
}

impl Settings {
    pub const LIST_KEYS: &'static [&'static str] = &["trusted_keys", "trusted_key_files"];

    /// Every setting but the trust ones (see [`Settings::trusted`]).
    pub fn validate(&self) -> Result<(), SettingsError> {
        if !(1..=1024).contains(&self.concurrency) {
            return invalid("concurrency", "must be between 1 and 1024");
        }
        if self.ack_wait < Duration::from_secs(1) {
            return invalid("ack_wait", "must be at least 1s");
        }
        if !(1..=22).contains(&self.patches.level) {
            return invalid("patches.level", "must be between 1 and 22");
        }
        if self.patches.max_file_bytes > 1 << 30 {
            return invalid("patches.max_file_bytes", "must be at most 1 GiB");
        }
        // The trust settings are checked where they are loaded, once ([`Settings::trusted`]).
        Ok(())
    }

    /// The root or the pinned keys, every one parsed (kept in memory: a restart walks the
    /// published roots again from the configured one).
    pub fn trusted(&self) -> Result<Trust, SettingsError> {
        Trust::load(
            &self.trusted_keys,
            &self.trusted_key_files,
            self.trusted_root_file.as_deref(),
            None,
        )
    }

    pub fn work_dir(&self) -> PathBuf {
        self.work_dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}
