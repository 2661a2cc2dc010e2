use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fleetcast_package::ArchiveLimits;
use fleetcast_runtime::settings::invalid;
use fleetcast_runtime::{NatsSettings, SettingsError};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub nats: NatsSettings,
    /// The Ed25519 secret key file (`fleetcast keygen`). Only the signer ever reads it.
    pub key_file: PathBuf,
    /// More secret key files, when the root's signing threshold asks for more than one
    /// signature: every manifest, directive and timestamp is signed with each.
    pub extra_key_files: Vec<PathBuf>,
    /// The first root of trust, when releases are signed under one (`fleetcast root`): the
    /// signer follows its rotations and will not announce what the current root's signing
    /// keys would not accept (the release waits, with an error logged, until keys and root
    /// agree).
    pub trusted_root_file: Option<PathBuf>,
    /// How often a fresh timestamp is published (agents report stale metadata when theirs
    /// grows older than their `max_metadata_age`).
    #[serde(with = "humantime_serde")]
    pub timestamp_interval: Duration,
    /// How long one timestamp stays valid.
    #[serde(with = "humantime_serde")]
    pub timestamp_ttl: Duration,
    /// Apps the signer will sign; `["*"]` is any app. Empty signs nothing (every release is
    /// rejected with `unknown_app`), unless `nats.insecure_dev` is on, where it means any app:
    /// a production signer signs only what it was told to.
    pub known_apps: Vec<String>,
    /// How long a signed manifest stays valid.
    #[serde(with = "humantime_serde")]
    pub manifest_ttl: Duration,
    /// Rollback directives expire sooner: they exist for an incident, not for a year.
    #[serde(with = "humantime_serde")]
    pub rollback_ttl: Duration,
    pub work_dir: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    pub limits: ArchiveLimits,
    /// `GET /health` and `GET /metrics` (Prometheus) are served here: default
    /// `127.0.0.1:8432` (the tracker has 8430, the watcher 8431, the distributor 8433). In a
    /// container, `0.0.0.0:8432` lets Prometheus reach it; port 0 takes any free port.
    pub metrics_listen: SocketAddr,
    /// Serve `/health` and `/metrics` over HTTPS with this certificate and key (PEM), for when
    /// `metrics_listen` is reachable from other machines.
    pub metrics_tls: Option<fleetcast_runtime::https::HttpsSettings>,
}

fleetcast_runtime::endpoint_settings!(Settings);

impl Default for Settings {
    fn default() -> Self {
        Settings {
            nats: NatsSettings::default(),
            key_file: PathBuf::from("keys/signing.key"),
            extra_key_files: Vec::new(),
            trusted_root_file: None,
            timestamp_interval: Duration::from_secs(60),
            timestamp_ttl: Duration::from_secs(3600),
            known_apps: Vec::new(),
            manifest_ttl: Duration::from_secs(365 * 24 * 3600),
            rollback_ttl: Duration::from_secs(7 * 24 * 3600),
            work_dir: None,
            ack_wait: Duration::from_secs(30),
            limits: ArchiveLimits::default(),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 8432)),
            metrics_tls: None,
        }
    }
}

/// `known_apps = ["*"]`: any app, said explicitly.
pub const ANY_APP: &str = "*";

/// The apps a signer signs (see [`Settings::signs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signs {
    Any,
    /// `known_apps` empty under `nats.insecure_dev`: any app, for local development.
    AnyInsecureDev,
    Nothing,
    Only(Vec<String>),
}

impl Signs {
    pub fn allows(&self, app: &str) -> bool {
        match self {
            Signs::Any | Signs::AnyInsecureDev => true,
            Signs::Nothing => false,
            Signs::Only(apps) => apps.iter().any(|a| a == app),
        }
    }
}

impl Settings {
    pub const LIST_KEYS: &'static [&'static str] = &["known_apps", "extra_key_files"];

    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.ack_wait < Duration::from_secs(1) {
            return invalid("ack_wait", "must be at least 1s");
        }
        if self.manifest_ttl < Duration::from_secs(60) {
            return invalid("manifest_ttl", "must be at least 1m");
        }
        if self.timestamp_interval < Duration::from_secs(1) {
            return invalid("timestamp_interval", "must be at least 1s");
        }
        if self.timestamp_ttl <= self.timestamp_interval {
            return invalid("timestamp_ttl", "must be longer than timestamp_interval");
        }
        if self.known_apps.iter().any(|a| a == ANY_APP) {
            if self.known_apps.len() > 1 {
                return invalid(
                    "known_apps",
                    "\"*\" (any app) stands alone: list app names, or \"*\" only",
                );
            }
            return Ok(());
        }
        for app in &self.known_apps {
            if let Err(reason) = fleetcast_events::names::validate_app_name(app) {
                return invalid("known_apps", reason.to_string());
            }
        }
        Ok(())
    }

    /// Which apps this signer signs, from `known_apps` (and `nats.insecure_dev` when empty).
    pub fn signs(&self) -> Signs {
        if self.known_apps.iter().any(|a| a == ANY_APP) {
            Signs::Any
        } else if self.known_apps.is_empty() {
            if self.nats.insecure_dev {
                Signs::AnyInsecureDev
            } else {
                Signs::Nothing
            }
        } else {
            Signs::Only(self.known_apps.clone())
        }
    }

    pub fn work_dir(&self) -> PathBuf {
        self.work_dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(apps: &[&str], insecure_dev: bool) -> Settings {
        let mut s = Settings {
            known_apps: apps.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        };
        s.nats.insecure_dev = insecure_dev;
        s
    }

    #[test]
    fn an_empty_known_apps_signs_nothing_unless_insecure_dev() {
        let production = with(&[], false);
        assert_eq!(production.signs(), Signs::Nothing);
        assert!(!production.signs().allows("collector"));
        assert!(with(&[], true).signs().allows("collector"));
        let listed = with(&["collector"], false);
        assert!(listed.validate().is_ok());
        assert!(listed.signs().allows("collector"));
        assert!(!listed.signs().allows("web"));
        // A list stays a list under insecure_dev too.
        assert!(!with(&["collector"], true).signs().allows("web"));
        let any = with(&["*"], false);
        assert!(any.validate().is_ok());
        assert_eq!(any.signs(), Signs::Any);
        assert!(any.signs().allows("web"));
        let e = with(&["*", "web"], false).validate().expect_err("mixed");
        assert!(e.to_string().contains("known_apps"), "{e}");
    }
}
