use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fleetcast_events::{AppName, RingName};
use fleetcast_runtime::settings::invalid;
use fleetcast_runtime::{NatsSettings, SettingsError};
use serde::Deserialize;

use crate::policy::AppPolicy;
use crate::rollout::{Rollout, Timing};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub nats: NatsSettings,
    /// Credentials (`.creds`) of the second NATS connection the tracker answers slot requests
    /// and operators' commands from: the `tracker-reply` identity of `ops/nats/gen-accounts`,
    /// which may publish to `_INBOX.>` and nothing else, so that no reply subject a requester
    /// names can make the tracker write a store. Unset: replies go out on the main
    /// connection (development without NATS identities; with `nats.credentials` set, the
    /// tracker warns).
    pub reply_credentials: Option<PathBuf>,
    /// HTTP API and dashboard.
    pub listen: SocketAddr,
    /// Serve them over HTTPS with this certificate and key (PEM): set it whenever `listen` is
    /// reachable from other machines.
    pub tls: Option<fleetcast_runtime::https::HttpsSettings>,
    /// Who may use the HTTP API, and whether reads need a token ([`crate::auth`]).
    pub http: crate::auth::HttpSettings,
    /// An agent silent this long is stale: shown as such, left out of rollout denominators.
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
    /// …and forgotten after this long.
    #[serde(with = "humantime_serde")]
    pub prune_after: Duration,
    /// A live host that is neither failing nor waiting and still not on its ring's version
    /// this long after the ring started is stuck (`fleetcast laggards`).
    #[serde(with = "humantime_serde")]
    pub stuck_after: Duration,
    /// The replacement hook for hosts offline or stuck too long (`[replace]`).
    pub replace: crate::laggards::ReplaceSettings,
    /// Remedies for stuck hosts: retry now, then restart the agent (`[remedy]`).
    pub remedy: crate::laggards::RemedySettings,
    /// A slot not finished within this is freed (the host died or hung).
    #[serde(with = "humantime_serde")]
    pub slot_lease: Duration,
    /// How often rollouts are moved on and state is saved.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// Rollout policy per app; apps not listed get [`AppPolicy::default`].
    pub apps: BTreeMap<AppName, AppPolicy>,
    /// How long the history (releases, rollouts, operators' actions) is kept.
    pub history: crate::history::HistorySettings,
    /// Receivers the history's entries are POSTed to, signed (`[[webhooks]]`).
    pub webhooks: Vec<crate::webhook::WebhookSettings>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            nats: NatsSettings::default(),
            reply_credentials: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 8430)),
            tls: None,
            http: Default::default(),
            stale_after: Duration::from_secs(45),
            prune_after: Duration::from_secs(7 * 24 * 3600),
            stuck_after: Duration::from_secs(900),
            replace: Default::default(),
            remedy: Default::default(),
            slot_lease: Duration::from_secs(600),
            tick: Duration::from_secs(1),
            apps: BTreeMap::new(),
            history: Default::default(),
            webhooks: Vec::new(),
        }
    }
}

impl Settings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        for (app, policy) in &self.apps {
            if let Err(reason) = policy.validate() {
                return invalid("apps", format!("{app}: {reason}"));
            }
        }
        if let Err(reason) = self.http.validate() {
            return invalid("http.tokens", reason.to_string());
        }
        if self.prune_after < self.stale_after {
            return invalid("prune_after", "must not be shorter than stale_after");
        }
        if !self.replace.command.is_empty() && self.replace.timeout.is_zero() {
            return invalid("replace.timeout", "must not be zero");
        }
        if let Err(reason) = crate::webhook::validate_all(&self.webhooks) {
            return invalid("webhooks", reason.to_string());
        }
        Ok(())
    }

    pub fn policy(&self, app: &str) -> AppPolicy {
        self.apps.get(app).cloned().unwrap_or_default()
    }

    /// The policy a rollout runs under: its app's, narrowed to one ring for a ring rollback.
    pub fn policy_for(&self, rollout: &Rollout) -> AppPolicy {
        self.policy_narrowed(&rollout.app, rollout.only_ring.as_ref())
    }

    /// `app`'s policy, with only `ring` when given (a ring it lacks gets the default ring's).
    pub fn policy_narrowed(&self, app: &str, ring: Option<&RingName>) -> AppPolicy {
        let mut policy = self.policy(app);
        if let Some(only) = ring {
            let ring = policy
                .rings
                .iter()
                .find(|r| r.name == *only)
                .cloned()
                .unwrap_or_else(|| {
                    let mut ring = AppPolicy::default().rings.remove(0);
                    ring.name = only.clone();
                    ring
                });
            policy.rings = vec![ring];
        }
        policy
    }

    pub fn timing(&self) -> Timing {
        Timing {
            stale_after: self.stale_after,
            slot_lease: self.slot_lease,
        }
    }
}
