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
    /// Folder CI or a person drops `NAME-VERSION.zip` files into.
    pub drop_dir: PathBuf,
    /// Where refused files go (default `<drop_dir>/rejected`), each with a `.reason.txt`.
    pub rejected_dir: Option<PathBuf>,
    /// Where accepted files go once uploaded (default `<drop_dir>/processed`).
    pub processed_dir: Option<PathBuf>,
    /// Scratch space for archives fetched from the store (default: the system temp folder).
    pub work_dir: Option<PathBuf>,
    /// A file is complete once its size and modification time stayed the same this long.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// Full rescan of the drop folder, in case a file-system event was missed.
    #[serde(with = "humantime_serde")]
    pub rescan: Duration,
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    pub limits: ArchiveLimits,
    /// `GET /health` and `GET /metrics` (Prometheus) are served here: default
    /// `127.0.0.1:8431` (the tracker has 8430, the signer 8432, the distributor 8433). In a
    /// container, `0.0.0.0:8431` lets Prometheus reach it; port 0 takes any free port.
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
            drop_dir: PathBuf::from("drop"),
            rejected_dir: None,
            processed_dir: None,
            work_dir: None,
            settle: Duration::from_secs(1),
            rescan: Duration::from_secs(30),
            ack_wait: Duration::from_secs(30),
            limits: ArchiveLimits::default(),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 8431)),
            metrics_tls: None,
        }
    }
}

impl Settings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.ack_wait < Duration::from_secs(1) {
            return invalid("ack_wait", "must be at least 1s");
        }
        if self.settle.is_zero() {
            return invalid("settle", "must be more than 0");
        }
        if self.rescan < Duration::from_secs(1) {
            return invalid("rescan", "must be at least 1s");
        }
        Ok(())
    }

    pub fn rejected_dir(&self) -> PathBuf {
        self.rejected_dir
            .clone()
            .unwrap_or_else(|| self.drop_dir.join("rejected"))
    }

    pub fn processed_dir(&self) -> PathBuf {
        self.processed_dir
            .clone()
            .unwrap_or_else(|| self.drop_dir.join("processed"))
    }

    pub fn work_dir(&self) -> PathBuf {
        self.work_dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}
