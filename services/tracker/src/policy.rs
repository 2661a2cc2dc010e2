//! Rollout policy per app, from the tracker's config: rings in order, each with how many hosts
//! may switch at once, a soak time, a failure threshold and maintenance windows; and whether a
//! release starts by itself or waits for an operator's approval.

use std::time::Duration;

use fleetcast_events::RingName;
use fleetcast_runtime::window::{Window, WindowError};
use serde::{Deserialize, Serialize};

/// A count (`3`) or a share of the ring's live hosts (`"25%"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "AmountText", into = "AmountText")]
pub enum Amount {
    Count(usize),
    Percent(u8),
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum AmountText {
    Number(usize),
    Text(String),
}

/// Why a text is not an [`Amount`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("{0:?}: a percentage is 1% to 100%")]
    Percent(String),
    #[error("{0:?} is neither a count nor a percentage")]
    NotAnAmount(String),
}

impl TryFrom<AmountText> for Amount {
    type Error = AmountError;

    fn try_from(value: AmountText) -> Result<Self, AmountError> {
        match value {
            AmountText::Number(n) => Ok(Amount::Count(n)),
            AmountText::Text(t) => {
                let t = t.trim();
                if let Some(p) = t.strip_suffix('%') {
                    match p.trim().parse::<u8>() {
                        Ok(p) if (1..=100).contains(&p) => Ok(Amount::Percent(p)),
                        _ => Err(AmountError::Percent(t.to_string())),
                    }
                } else {
                    t.parse()
                        .map(Amount::Count)
                        .map_err(|_| AmountError::NotAnAmount(t.to_string()))
                }
            }
        }
    }
}

impl From<Amount> for AmountText {
    fn from(a: Amount) -> Self {
        match a {
            Amount::Count(n) => AmountText::Number(n),
            Amount::Percent(p) => AmountText::Text(format!("{p}%")),
        }
    }
}

impl Amount {
    /// How many of `total` hosts this is; a percentage of a non-empty ring is at least one.
    pub fn of(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n,
            Amount::Percent(p) => (total * p as usize)
                .div_ceil(100)
                .max(usize::from(total > 0)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Approval {
    /// A stored release starts rolling out at once.
    #[default]
    Auto,
    /// Agents may download it, but nobody switches until `fleetcast approve`.
    Manual,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingPolicy {
    pub name: RingName,
    /// Hosts of this ring switching at once (the rollout slots).
    #[serde(default = "all")]
    pub parallel: Amount,
    /// Wait after the ring completed before the next ring starts.
    #[serde(default, with = "humantime_serde")]
    pub soak: Duration,
    /// Failures (rolled back or refused) that halt the rollout…
    #[serde(default = "one")]
    pub max_failures: Amount,
    /// …once at least this many hosts of the ring reported a result.
    #[serde(default = "one_result")]
    pub min_results: usize,
    /// UTC ranges in which this ring's hosts may switch; empty means any time.
    #[serde(default)]
    pub windows: Vec<String>,
}

fn all() -> Amount {
    Amount::Percent(100)
}
fn one() -> Amount {
    Amount::Count(1)
}
fn one_result() -> usize {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppPolicy {
    #[serde(default)]
    pub approval: Approval,
    pub rings: Vec<RingPolicy>,
}

impl Default for AppPolicy {
    /// One ring, `default`, everyone at once, halted by the first failure.
    fn default() -> Self {
        AppPolicy {
            approval: Approval::Auto,
            rings: vec![RingPolicy {
                name: RingName::from_static("default"),
                parallel: all(),
                soak: Duration::ZERO,
                max_failures: one(),
                min_results: 1,
                windows: Vec::new(),
            }],
        }
    }
}

/// Why an app's policy is refused (the settings name the app).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("a policy needs at least one ring")]
    NoRing,
    #[error("ring {0:?} appears twice")]
    RingTwice(RingName),
    #[error("ring {0:?}: parallel must be at least 1")]
    NoParallel(RingName),
    /// One of the ring's `windows` is not a UTC range.
    #[error("ring {ring:?}: {cause}")]
    Window { ring: RingName, cause: WindowError },
}

impl AppPolicy {
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.rings.is_empty() {
            return Err(PolicyError::NoRing);
        }
        let mut seen = std::collections::BTreeSet::new();
        for ring in &self.rings {
            if !seen.insert(&ring.name) {
                return Err(PolicyError::RingTwice(ring.name.clone()));
            }
            if ring.parallel == Amount::Count(0) {
                return Err(PolicyError::NoParallel(ring.name.clone()));
            }
            ring.windows()?;
        }
        Ok(())
    }
}

impl RingPolicy {
    pub fn windows(&self) -> Result<Vec<Window>, PolicyError> {
        self.windows
            .iter()
            .map(|w| {
                w.parse::<Window>().map_err(|cause| PolicyError::Window {
                    ring: self.name.clone(),
                    cause,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_and_scale() {
        let parse = |t: &str| serde_json::from_str::<Amount>(t).ok();
        assert_eq!(parse("3"), Some(Amount::Count(3)));
        assert_eq!(parse("\"25%\""), Some(Amount::Percent(25)));
        assert_eq!(parse("\"7\""), Some(Amount::Count(7)));
        assert!(parse("\"0%\"").is_none());
        assert!(parse("\"lots\"").is_none());
        let why = |t: &str| AmountText::Text(t.into()).try_into().map(|_: Amount| ());
        assert_eq!(why("0%"), Err(AmountError::Percent("0%".into())));
        assert_eq!(why("lots"), Err(AmountError::NotAnAmount("lots".into())));
        assert_eq!(Amount::Percent(25).of(10), 3);
        assert_eq!(
            Amount::Percent(1).of(3),
            1,
            "a share of a ring is at least one host"
        );
        assert_eq!(Amount::Percent(50).of(0), 0);
        assert_eq!(Amount::Count(2).of(100), 2);
    }

    #[test]
    fn policies_are_checked() {
        assert!(AppPolicy::default().validate().is_ok());
        let mut p = AppPolicy::default();
        p.rings.push(p.rings[0].clone());
        assert_eq!(
            p.validate(),
            Err(PolicyError::RingTwice(RingName::from_static("default")))
        );
        assert!(p.validate().is_err_and(|e| e.to_string().contains("twice")));
        let mut p = AppPolicy::default();
        p.rings[0].windows = vec!["25:00-02:00".into()];
        assert!(matches!(p.validate(), Err(PolicyError::Window { .. })));
        assert!(
            AppPolicy {
                approval: Approval::Auto,
                rings: vec![]
            }
            .validate()
            .is_err()
        );
    }
}
