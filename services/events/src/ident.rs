//! The names fleetcast takes from outside (apps, rings, agent ids, API token names) as types
//! that can only hold a valid value. A value is checked once, where it is decoded
//! (`serde(try_from)`) or parsed (`FromStr`, `TryFrom`), so a handler that receives one never
//! checks it again, and the rule of each name lives in one place: [`crate::names`] for the
//! ones that appear in subjects, keys and file names.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A name that was refused, with the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidName(pub String);

/// One name type: a `String` that passed `$check` (a `fn(&str) -> Result<(), InvalidName>`), read
/// as a `&str` everywhere, written and read back as a plain JSON or MessagePack string, and
/// described in the JSON Schemas by `$pattern`.
macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $check:path, $pattern:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// A name written in the code itself (a test, a default), as `http`'s
            /// `HeaderValue::from_static`: never for a value from outside.
            ///
            /// # Panics
            /// If `name` breaks the rule: a mistake in the code, not in its input.
            pub fn from_static(name: &'static str) -> Self {
                match Self::try_from(name) {
                    Ok(valid) => valid,
                    Err(e) => panic!("{e}"),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(value: String) -> Result<Self, InvalidName> {
                $check(&value)?;
                Ok($name(value))
            }
        }

        impl TryFrom<&str> for $name {
            type Error = InvalidName;
            fn try_from(value: &str) -> Result<Self, InvalidName> {
                Self::try_from(value.to_string())
            }
        }

        impl FromStr for $name {
            type Err = InvalidName;
            fn from_str(value: &str) -> Result<Self, InvalidName> {
                Self::try_from(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<std::ffi::OsStr> for $name {
            fn as_ref(&self) -> &std::ffi::OsStr {
                self.0.as_ref()
            }
        }

        /// Safe as a file name: no name type allows `/`, `.` alone or `..`.
        impl AsRef<std::path::Path> for $name {
            fn as_ref(&self) -> &std::path::Path {
                self.0.as_ref()
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn inline_schema() -> bool {
                true
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({ "type": "string", "pattern": $pattern })
            }
        }
    };
}

name_type!(
    /// An app's name: it appears in subjects, keys and file names (see
    /// [`crate::names::validate_app_name`]).
    AppName,
    crate::names::validate_app_name,
    "^[a-z0-9][a-z0-9_-]{0,63}$"
);

name_type!(
    /// A ring's name: the same alphabet as an app's, for the same reasons.
    RingName,
    crate::names::validate_ring_name,
    "^[a-z0-9][a-z0-9_-]{0,63}$"
);

name_type!(
    /// An agent's id: a token of the subjects it reports on (see
    /// [`crate::names::validate_agent_id`]).
    AgentId,
    crate::names::validate_agent_id,
    "^[A-Za-z0-9_-]{1,128}$"
);

name_type!(
    /// An HTTP API token's name: letters, digits, `-`, `_` and `.`, at most 64, so that
    /// `http:<name>` reads plainly in the history and in logs.
    TokenName,
    validate_token_name,
    "^[A-Za-z0-9._-]{1,64}$"
);

fn validate_token_name(name: &str) -> Result<(), InvalidName> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(InvalidName(format!(
            "token name {name:?}: 1 to 64 letters, digits, '-', '_' or '.'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_name_is_refused_where_it_is_decoded() {
        let app: AppName = serde_json::from_str("\"collector-2\"").expect("valid");
        assert_eq!(app, "collector-2");
        assert_eq!(
            serde_json::to_string(&app).expect("json"),
            "\"collector-2\""
        );
        for bad in ["\"Collector\"", "\"a.b\"", "\"\"", "\"-x\"", "\"a*\""] {
            let err = serde_json::from_str::<AppName>(bad).expect_err(bad);
            assert!(err.to_string().contains("app name"), "{bad}: {err}");
        }
        let packed = rmp_serde::to_vec_named(&app).expect("msgpack");
        assert_eq!(
            rmp_serde::from_slice::<AppName>(&packed).expect("back"),
            app
        );
        let bad = rmp_serde::to_vec_named("a b").expect("msgpack");
        assert!(rmp_serde::from_slice::<AppName>(&bad).is_err());
    }

    #[test]
    fn each_name_keeps_its_own_rule() {
        assert!("prod".parse::<RingName>().is_ok());
        assert!("Prod".parse::<RingName>().is_err());
        assert!("Host_7-b".parse::<AgentId>().is_ok());
        assert!("h.1".parse::<AgentId>().is_err());
        assert!("ci.main".parse::<TokenName>().is_ok());
        assert!("ci main".parse::<TokenName>().is_err());
        assert!(AgentId::try_from("x".repeat(129)).is_err());
    }

    #[test]
    fn the_schema_pattern_says_what_the_check_does() {
        let pattern = |schema: schemars::Schema| {
            regex::Regex::new(
                schema
                    .get("pattern")
                    .and_then(|p| p.as_str())
                    .expect("pattern"),
            )
            .expect("regex")
        };
        let app = pattern(schemars::schema_for!(AppName));
        let agent = pattern(schemars::schema_for!(AgentId));
        let token = pattern(schemars::schema_for!(TokenName));
        for candidate in [
            "a",
            "web-1",
            "a_b",
            "A",
            "-a",
            "a.b",
            "",
            "x y",
            &"a".repeat(65),
        ] {
            assert_eq!(
                app.is_match(candidate),
                candidate.parse::<AppName>().is_ok(),
                "{candidate:?}"
            );
            assert_eq!(
                agent.is_match(candidate),
                candidate.parse::<AgentId>().is_ok(),
                "{candidate:?}"
            );
            assert_eq!(
                token.is_match(candidate),
                candidate.parse::<TokenName>().is_ok(),
                "{candidate:?}"
            );
        }
    }
}
