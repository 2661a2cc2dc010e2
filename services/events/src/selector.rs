//! A label selector: which hosts a rollout (or a listing) is about, by the labels their agents
//! carry (`role=web`, `region=eu`, from each agent's settings). Written as comma-separated terms
//! that must all hold, `key=value` or `key!=value`, the equality subset of Kubernetes' selectors
//! that operators already know. Checked once where it is parsed or decoded, so whoever holds
//! one holds a valid one, and written back the same way it was read.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest label key or value a selector names (the agents' own labels are not limited here:
/// a label longer than this simply matches no term).
pub const MAX_LABEL_LEN: usize = 63;

/// Hosts whose labels satisfy every term.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Selector(Vec<Term>);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Term {
    key: String,
    value: String,
    equal: bool,
}

/// Why a text is not a [`Selector`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("a selector needs at least one term, e.g. role=web")]
    Empty,
    #[error("{0:?} is neither key=value nor key!=value")]
    NoOperator(String),
    #[error(
        "label {0:?}: 1 to {MAX_LABEL_LEN} letters, digits, '.', '_', '-' or '/', starting with a letter or digit"
    )]
    BadKey(String),
    #[error("value {0:?}: 1 to {MAX_LABEL_LEN} letters, digits, '.', '_' or '-'")]
    BadValue(String),
}

impl Selector {
    /// Whether a host with these labels is selected: every `key=value` present with that value,
    /// every `key!=value` absent or with another value.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0
            .iter()
            .all(|t| (labels.get(&t.key) == Some(&t.value)) == t.equal)
    }
}

fn valid_key(key: &str) -> bool {
    let mut chars = key.chars();
    key.len() <= MAX_LABEL_LEN
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
}

fn valid_value(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_LABEL_LEN
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(text: &str) -> Result<Self, SelectorError> {
        let mut terms = Vec::new();
        for raw in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (key, value, equal) = match raw.split_once("!=") {
                Some((k, v)) => (k, v, false),
                None => match raw.split_once('=') {
                    Some((k, v)) => (k, v.strip_prefix('=').unwrap_or(v), true),
                    None => return Err(SelectorError::NoOperator(raw.to_string())),
                },
            };
            let (key, value) = (key.trim(), value.trim());
            if !valid_key(key) {
                return Err(SelectorError::BadKey(key.to_string()));
            }
            if !valid_value(value) {
                return Err(SelectorError::BadValue(value.to_string()));
            }
            terms.push(Term {
                key: key.to_string(),
                value: value.to_string(),
                equal,
            });
        }
        if terms.is_empty() {
            return Err(SelectorError::Empty);
        }
        Ok(Selector(terms))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.0.iter().enumerate() {
            let op = if t.equal { "=" } else { "!=" };
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep}{}{op}{}", t.key, t.value)?;
        }
        Ok(())
    }
}

impl TryFrom<String> for Selector {
    type Error = SelectorError;
    fn try_from(value: String) -> Result<Self, SelectorError> {
        value.parse()
    }
}

impl From<Selector> for String {
    fn from(value: Selector) -> String {
        value.to_string()
    }
}

impl schemars::JsonSchema for Selector {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Selector".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "Comma-separated label terms that must all hold: key=value or key!=value.",
            "pattern": "^[^,]+(!?=)[^,]+(,[^,]+(!?=)[^,]+)*$"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_term_must_hold() {
        let s: Selector = "role=web, region!=us".parse().expect("valid");
        assert!(s.matches(&labels(&[("role", "web"), ("region", "eu")])));
        assert!(
            s.matches(&labels(&[("role", "web")])),
            "an absent label is not equal to anything"
        );
        assert!(!s.matches(&labels(&[("role", "web"), ("region", "us")])));
        assert!(!s.matches(&labels(&[("role", "db")])));
        assert!(!s.matches(&labels(&[])));
        assert_eq!(s.to_string(), "role=web,region!=us");
        let double: Selector = "tier==gold".parse().expect("== is =");
        assert_eq!(double.to_string(), "tier=gold");
    }

    #[test]
    fn bad_selectors_say_what_is_wrong() {
        let why = |t: &str| t.parse::<Selector>().err();
        assert_eq!(why(""), Some(SelectorError::Empty));
        assert_eq!(why(" , "), Some(SelectorError::Empty));
        assert_eq!(why("web"), Some(SelectorError::NoOperator("web".into())));
        assert_eq!(why("=web"), Some(SelectorError::BadKey("".into())));
        assert_eq!(why("role="), Some(SelectorError::BadValue("".into())));
        assert_eq!(why("role=a b"), Some(SelectorError::BadValue("a b".into())));
        assert_eq!(why("-x=1"), Some(SelectorError::BadKey("-x".into())));
        assert!(why(&format!("k={}", "v".repeat(MAX_LABEL_LEN + 1))).is_some());
    }

    #[test]
    fn it_travels_as_the_text_it_was_written_as() {
        let s: Selector = serde_json::from_str("\"region=eu,role!=db\"").expect("decodes");
        assert_eq!(
            serde_json::to_string(&s).expect("encodes"),
            "\"region=eu,role!=db\""
        );
        assert!(serde_json::from_str::<Selector>("\"nonsense\"").is_err());
    }
}
