use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fleetcast_events::{AgentId, AppName, RingName};
use fleetcast_runtime::settings::invalid;
use fleetcast_runtime::window::{Window, WindowError};
use fleetcast_runtime::{NatsSettings, SettingsError};
use serde::Deserialize;

use crate::crash_policy::CrashPolicy;
use crate::health::HealthGate;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub nats: NatsSettings,
    /// This host's name in the fleet (default: the host name).
    pub agent_id: String,
    pub ring: RingName,
    pub labels: BTreeMap<String, String>,
    /// Install folders, journals and state: `<data_dir>/apps/<app>/`.
    pub data_dir: PathBuf,
    /// The first root of trust (`fleetcast root`): the agent follows its rotations from there
    /// and keeps the newest in `<data_dir>/trust/`. Recommended over pinned keys.
    pub trusted_root_file: Option<PathBuf>,
    /// Or release-signing public keys pinned here (base64) and files holding them: these never
    /// rotate without a config change.
    pub trusted_keys: Vec<String>,
    pub trusted_key_files: Vec<PathBuf>,
    /// When the signer's newest timestamp the agent holds is older than this, the agent reports
    /// stale metadata (an announcement may be withheld); `0s` turns the check off.
    #[serde(with = "humantime_serde")]
    pub max_metadata_age: Duration,
    /// How far the signer's clock and this host's may disagree: a signed timestamp issued
    /// further ahead of this host's clock is refused and the agent reports its clock as behind
    /// (stale metadata); expiries of roots, timestamps and manifests are judged this much late.
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// Complete versions kept on disk per app (current and previous always are).
    pub keep_versions: usize,
    /// Chunks fetched at once (memory stays near this many chunks).
    pub concurrency: usize,
    /// How long the agent waits after taking a new version before it fetches anything. The
    /// whole fleet takes an announcement at once, and the first hosts' downloads would
    /// otherwise load the store (and in `ops/bench fleet`, the shared CPU) while it is still
    /// reaching the others. The default is about twice what 1,000 agents on two cores take to
    /// hear one, and nothing next to a download: in that bench the last agent heard it 20-30
    /// ms sooner with the delay, and the fleet converged no later.
    #[serde(with = "humantime_serde")]
    pub fetch_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Slow re-read of the desired state, a last resort behind the watch.
    #[serde(with = "humantime_serde")]
    pub recheck: Duration,
    /// UTC ranges (`"22:00-04:00"`) in which updates may switch; empty means any time.
    pub update_windows: Vec<String>,
    /// When a rollout asks for slots and no slot service answers, ask again after this long
    /// (meanwhile the staged version waits; the running app is untouched).
    #[serde(with = "humantime_serde")]
    pub slot_retry: Duration,
    /// Off by default (the agent runs on every host and stays small): when set, e.g.
    /// `127.0.0.1:8434`, `GET /health` (503 while NATS is unreachable) and `GET /metrics` (each
    /// app's state, running version, uptime, updates and rollbacks) are served there.
    pub metrics_listen: Option<SocketAddr>,
    /// …over HTTPS with this certificate and key (PEM).
    pub metrics_tls: Option<fleetcast_runtime::https::HttpsSettings>,
    pub apps: Vec<AppSettings>,
    /// The agent's own updates (only under `fleetcast-launcher`; see docs/self-update.md).
    pub self_update: SelfUpdate,
}

/// How the agent takes a release of itself (the reserved app [`SelfUpdate::app`]).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SelfUpdate {
    /// Off: releases of the agent are not followed (it is updated by hand).
    pub enabled: bool,
    /// A new agent must have loaded its state, connected, read its desired state and published
    /// a heartbeat within this long of its start, or the launcher goes back to this one.
    #[serde(with = "humantime_serde")]
    pub qualify: Duration,
    /// …and then run this long without exiting before it becomes current.
    #[serde(with = "humantime_serde")]
    pub soak: Duration,
}

impl Default for SelfUpdate {
    fn default() -> Self {
        SelfUpdate {
            enabled: true,
            qualify: Duration::from_secs(60),
            soak: Duration::from_secs(30),
        }
    }
}

impl SelfUpdate {
    /// The app the agent's releases are published as, one per platform (the binary in a
    /// release runs on one): `fleetcast-agent-linux-x86_64`, `fleetcast-agent-linux-aarch64`.
    pub fn app() -> AppName {
        let app = fleetcast_events::names::agent_app(std::env::consts::OS, std::env::consts::ARCH);
        // Rust's OS and architecture names are lowercase letters, digits and '_'.
        AppName::try_from(app).expect("the agent's app name is valid on every Rust platform")
    }

    /// Where a release of the agent holds its binary.
    pub const BINARY: &'static str = "bin/fleetcast-agent";
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AppSettings {
    pub name: AppName,
    /// Program (in the version's folder, or on PATH) and arguments. May be left empty when
    /// every package names its own in its `fleetcast.toml`, which wins over this.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub health: HealthGate,
    #[serde(default)]
    pub crash: CrashPolicy,
    /// Drain time between the stop signal and SIGKILL.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub grace: Duration,
    /// The user the app, its hooks and its health command run as (a name or a numeric id),
    /// with its supplementary groups cleared; unset: the agent's own user. Looked up once at
    /// start (an unknown user stops the agent with an error). Not root.
    #[serde(default)]
    pub user: Option<String>,
    /// Its group (name or id); default: the user's primary group. Only with `user`.
    #[serde(default)]
    pub group: Option<String>,
    /// Before every start, hash the version's files against its signed tree and refuse to
    /// start a version whose folder changed since it was installed.
    #[serde(default)]
    pub verify_on_start: bool,
    /// TCP addresses (e.g. `127.0.0.1:8080`) the agent listens on for the app and hands to each
    /// of its processes by systemd's socket-activation protocol (`LISTEN_FDS`, fds 3, 4, …):
    /// connections made while one version drains and the next starts wait in the kernel's
    /// queue instead of being refused. Bound when the agent starts; the app must take them
    /// instead of binding the addresses itself (the demo app does).
    #[serde(default)]
    pub listen: Vec<std::net::SocketAddr>,
}

impl AppSettings {
    /// The agent's own releases as an app ([`SelfUpdate::app`]): nothing to start or check,
    /// the launcher runs it.
    pub fn for_agent() -> AppSettings {
        AppSettings {
            name: SelfUpdate::app(),
            command: vec![SelfUpdate::BINARY.into()],
            env: BTreeMap::new(),
            health: HealthGate::default(),
            crash: CrashPolicy::default(),
            grace: default_grace(),
            user: None,
            group: None,
            verify_on_start: false,
            listen: Vec::new(),
        }
    }
}

fn default_grace() -> Duration {
    Duration::from_secs(10)
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            nats: NatsSettings::default(),
            agent_id: std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "agent".into()),
            ring: RingName::from_static("default"),
            labels: BTreeMap::new(),
            data_dir: PathBuf::from("/var/lib/fleetcast/agent"),
            trusted_root_file: None,
            trusted_keys: Vec::new(),
            trusted_key_files: Vec::new(),
            max_metadata_age: Duration::from_secs(15 * 60),
            max_clock_skew: fleetcast_runtime::trust::DEFAULT_MAX_CLOCK_SKEW,
            keep_versions: 3,
            concurrency: 8,
            fetch_delay: Duration::from_millis(100),
            heartbeat: Duration::from_secs(15),
            recheck: Duration::from_secs(300),
            update_windows: Vec::new(),
            slot_retry: Duration::from_secs(10),
            metrics_listen: None,
            metrics_tls: None,
            apps: Vec::new(),
            self_update: SelfUpdate::default(),
        }
    }
}

impl Settings {
    /// This agent's id: `agent_id`, by default the host name, which must then be one (a host
    /// named `web-1.example.com` needs `agent_id` set).
    pub fn id(&self) -> Result<AgentId, SettingsError> {
        AgentId::try_from(self.agent_id.as_str()).or_else(|e| invalid("agent_id", e.to_string()))
    }

    pub const LIST_KEYS: &'static [&'static str] =
        &["trusted_keys", "trusted_key_files", "update_windows"];

    /// Every setting but the trust ones (see [`Settings::trust`]).
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.id()?;
        // The tracker answers this agent's slot requests only under its own inbox, the one its
        // NATS identity may read (the default when unset).
        let inbox = fleetcast_events::names::agent_inbox_prefix(&self.agent_id);
        if self.nats.inbox_prefix.as_ref().is_some_and(|p| *p != inbox) {
            return invalid(
                "nats.inbox_prefix",
                format!("must be {inbox:?} (or unset) for agent {:?}", self.agent_id),
            );
        }
        if self.keep_versions < 2 {
            return invalid("keep_versions", "must be at least 2 (current and previous)");
        }
        if !(1..=256).contains(&self.concurrency) {
            return invalid("concurrency", "must be between 1 and 256");
        }
        if self.max_clock_skew > Duration::from_secs(24 * 3600) {
            return invalid("max_clock_skew", "must be at most 24h");
        }
        if self.fetch_delay > Duration::from_secs(60) {
            return invalid("fetch_delay", "must be at most 60s");
        }
        if self.self_update.qualify.is_zero()
            || self.self_update.qualify > Duration::from_secs(3600)
        {
            return invalid("self_update.qualify", "must be between 1s and 1h");
        }
        if self.self_update.soak > Duration::from_secs(24 * 3600) {
            return invalid("self_update.soak", "must be at most 24h");
        }
        self.windows()?;
        for app in &self.apps {
            if fleetcast_events::names::is_agent_app(&app.name) {
                return invalid(
                    "apps.name",
                    format!(
                        "{} is reserved for the agent's own releases (see self_update)",
                        app.name
                    ),
                );
            }
            // Looked up here, so an unknown user stops the agent before it connects.
            match &app.user {
                Some(user) => {
                    if let Err(reason) =
                        crate::isolation::RunAs::resolve(user, app.group.as_deref())
                    {
                        return invalid("apps.user", format!("app {}: {reason}", app.name));
                    }
                }
                None if app.group.is_some() => {
                    return invalid(
                        "apps.group",
                        format!("app {}: set without apps.user", app.name),
                    );
                }
                None => {}
            }
        }
        // The trust settings are checked where they are loaded, once ([`Settings::trust`]):
        // loading reads the root files and the state folder.
        Ok(())
    }

    /// The agent's trust, with its state kept in `<data_dir>/trust/` (outside the apps'
    /// install folders).
    pub fn trust(&self) -> Result<fleetcast_runtime::Trust, SettingsError> {
        fleetcast_runtime::Trust::load_with(
            &self.trusted_keys,
            &self.trusted_key_files,
            self.trusted_root_file.as_deref(),
            Some(&self.data_dir.join("trust")),
            self.max_clock_skew,
            time::OffsetDateTime::now_utc(),
        )
    }

    pub fn max_metadata_age(&self) -> Option<Duration> {
        Some(self.max_metadata_age).filter(|d| !d.is_zero())
    }

    /// The parsed update windows.
    pub fn windows(&self) -> Result<Vec<Window>, SettingsError> {
        self.update_windows
            .iter()
            .map(|w| {
                w.parse()
                    .or_else(|e: WindowError| invalid("update_windows", e.to_string()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agents_inbox_prefix_is_its_own() {
        let mut settings = Settings {
            agent_id: "web-1".into(),
            ..Default::default()
        };
        assert!(settings.validate().is_ok());
        settings.nats.inbox_prefix = Some("_INBOX.web-1".into());
        assert!(settings.validate().is_ok());
        for other in ["_INBOX", "_INBOX.web-2", "_INBOX.web-1.x"] {
            settings.nats.inbox_prefix = Some(other.into());
            assert!(settings.validate().is_err(), "{other} accepted");
        }
    }

    /// A bad ring or app name in the settings file stops the agent at start, saying which
    /// setting and why; a host name that is no agent id needs `agent_id`.
    #[test]
    fn bad_names_in_the_settings_are_refused_with_the_setting_that_holds_them() {
        let dir = tempfile::tempdir().expect("tmp");
        let load = |toml: &str| {
            let path = dir.path().join("agent.toml");
            std::fs::write(&path, toml).expect("write");
            fleetcast_runtime::settings::load_settings_from::<Settings>(
                "agent",
                Some(&path),
                Settings::LIST_KEYS,
                Vec::new(),
            )
        };
        let err = load("agent_id = \"h1\"\nring = \"Prod\"\n").expect_err("bad ring");
        let text = err.to_string();
        assert!(text.contains("ring") && text.contains("\"Prod\""), "{text}");
        let err = load("agent_id = \"h1\"\n[[apps]]\nname = \"Web App\"\ncommand = [\"x\"]\n")
            .expect_err("bad app");
        assert!(err.to_string().contains("\"Web App\""), "{err}");
        let fqdn = load("agent_id = \"web-1.example.com\"\n").expect("loads");
        let err = fqdn.validate().expect_err("no id");
        assert!(err.to_string().contains("agent_id"), "{err}");
    }
}
