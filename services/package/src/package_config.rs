//! A package's own `fleetcast.toml`: how this version runs (command line, environment, health
//! gate) and the hooks around its switch. It travels inside the archive, so the signature
//! covers it; the watcher refuses a package whose file does not parse, and the agent reads it
//! from the verified version folder.
//!
//! ```toml
//! command = ["bin/collector", "--config", "collector.yaml"]
//! [env]
//! COLLECTOR_MODE = "agent"
//! [health]
//! stay_up = "5s"
//! http = "http://127.0.0.1:8080/health"
//! [hooks.pre_switch]          # runs before the running app is touched; failing aborts
//! command = ["bin/migrate"]
//! timeout = "2m"
//! [hooks.post_switch]         # runs once the new version passed its gate; failing rolls back
//! command = ["bin/warm-cache"]
//! timeout = "30s"
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// The file's path at the root of the package.
pub const FILE_NAME: &str = "fleetcast.toml";

/// Larger files are refused: it is a few lines of settings.
pub const MAX_SIZE: u64 = 64 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageConfig {
    /// Program (relative to the version's folder, or absolute) and arguments; replaces the
    /// agent's configured command for this version.
    pub command: Option<Vec<String>>,
    /// Defaults for the app's environment; the agent's configured `env` wins (it is per host).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Replaces the agent's configured health gate for this version.
    pub health: Option<HealthGate>,
    #[serde(default)]
    pub hooks: Hooks,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    /// Runs in the new version's folder while the old version still serves (e.g. a schema
    /// migration). Failing, or running past its timeout, aborts the update untouched.
    pub pre_switch: Option<Hook>,
    /// Runs after the new version passed its health gate; failing rolls back.
    pub post_switch: Option<Hook>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    pub command: Vec<String>,
    #[serde(default = "default_hook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_hook_timeout() -> Duration {
    Duration::from_secs(60)
}

/// What a new version must pass before it is committed: it stays up for `stay_up`, then an
/// optional HTTP probe answers 2xx and an optional command exits 0, each within its timeout
/// and a few attempts. Set by the agent's config per app, or by the package itself.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthGate {
    #[serde(with = "humantime_serde")]
    pub stay_up: Duration,
    /// `http://127.0.0.1:PORT/PATH` answered with 2xx.
    pub http: Option<String>,
    /// A command (program and arguments) that must exit 0, run in the version's folder.
    pub command: Option<Vec<String>>,
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    pub probe_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
}

impl Default for HealthGate {
    fn default() -> Self {
        HealthGate {
            stay_up: Duration::from_secs(5),
            http: None,
            command: None,
            probe_timeout: Duration::from_secs(3),
            probe_attempts: 5,
            probe_interval: Duration::from_secs(1),
        }
    }
}

/// Longest a hook may be given: a hook that needs longer is better run as its own release step.
const MAX_HOOK_TIMEOUT: Duration = Duration::from_secs(3600);

/// Why a package's `fleetcast.toml` is refused (and with it the package).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackageConfigError {
    #[error("{FILE_NAME} must be a regular file")]
    NotAFile,
    #[error("{FILE_NAME} is {size} bytes, the limit is {MAX_SIZE}")]
    TooLarge { size: u64 },
    #[error("{FILE_NAME} is not UTF-8")]
    NotUtf8,
    /// Not TOML, or not the fields this file has (the parser's own words).
    #[error("{FILE_NAME}: {0}")]
    Syntax(String),
    /// `field` (a command, the health gate's or a hook's) names no program.
    #[error("{FILE_NAME}: {field} is an empty command")]
    EmptyCommand { field: &'static str },
    #[error("{FILE_NAME}: health.http {url:?} must be an http:// URL")]
    HealthUrl { url: String },
    #[error(
        "{FILE_NAME}: {hook}.timeout must be between 1 s and {} s",
        MAX_HOOK_TIMEOUT.as_secs()
    )]
    HookTimeout { hook: &'static str },
    #[error("{FILE_NAME}: env has an invalid variable name")]
    EnvName,
}

impl PackageConfig {
    /// Parses and checks the file's text; the error says what is wrong, for the refusal.
    pub fn parse(text: &str) -> Result<PackageConfig, PackageConfigError> {
        let config: PackageConfig = toml::from_str(text)
            .map_err(|e| PackageConfigError::Syntax(e.message().to_string()))?;
        let empty = |field| Err(PackageConfigError::EmptyCommand { field });
        if config.command.as_ref().is_some_and(|c| c.is_empty()) {
            return empty("command");
        }
        if let Some(health) = &config.health {
            if health.command.as_ref().is_some_and(|c| c.is_empty()) {
                return empty("health.command");
            }
            if let Some(url) = &health.http
                && !url.starts_with("http://")
            {
                return Err(PackageConfigError::HealthUrl { url: url.clone() });
            }
        }
        for (field, hook) in [
            ("hooks.pre_switch", &config.hooks.pre_switch),
            ("hooks.post_switch", &config.hooks.post_switch),
        ] {
            let Some(hook) = hook else { continue };
            if hook.command.is_empty() {
                return empty(field);
            }
            if hook.timeout.is_zero() || hook.timeout > MAX_HOOK_TIMEOUT {
                return Err(PackageConfigError::HookTimeout { hook: field });
            }
        }

        if config
            .env
            .keys()
            .any(|k| k.is_empty() || k.contains(['=', '\0']))
        {
            return Err(PackageConfigError::EnvName);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses() {
        let config = PackageConfig::parse(
            r#"
            command = ["bin/app", "--port", "8080"]
            [env]
            MODE = "x"
            [health]
            stay_up = "2s"
            http = "http://127.0.0.1:8080/health"
            [hooks.pre_switch]
            command = ["bin/migrate"]
            timeout = "90s"
            [hooks.post_switch]
            command = ["bin/warm"]
            "#,
        )
        .expect("valid");
        assert_eq!(
            config.command.as_deref(),
            Some(&["bin/app".to_string(), "--port".into(), "8080".into()][..])
        );
        let health = config.health.expect("health");
        assert_eq!(health.stay_up, Duration::from_secs(2));
        assert_eq!(health.probe_attempts, 5, "unset fields keep their defaults");
        let pre = config.hooks.pre_switch.expect("pre");
        assert_eq!(pre.timeout, Duration::from_secs(90));
        let post = config.hooks.post_switch.expect("post");
        assert_eq!(post.timeout, default_hook_timeout());
    }

    #[test]
    fn empty_file_means_the_agent_config_decides() {
        assert_eq!(PackageConfig::parse(""), Ok(PackageConfig::default()));
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, expected) in [
            ("command = []", "command is an empty command"),
            ("comand = [\"x\"]", "unknown field"),
            ("command = \"bin/app\"", "invalid type"),
            (
                "[hooks.pre_switch]\ncommand = []",
                "hooks.pre_switch is an empty",
            ),
            (
                "[hooks.post_switch]\ncommand = [\"x\"]\ntimeout = \"0s\"",
                "timeout must be",
            ),
            (
                "[hooks.pre_switch]\ncommand = [\"x\"]\ntimeout = \"3d\"",
                "timeout must be",
            ),
            ("[health]\nhttp = \"https://x\"", "must be an http://"),
            ("[env]\n\"A=B\" = \"c\"", "invalid variable name"),
            ("command = [\"a\"", "fleetcast.toml"),
        ] {
            let err = PackageConfig::parse(text).expect_err(text);
            assert!(err.to_string().contains(expected), "{text:?}: {err}");
        }
    }
}
