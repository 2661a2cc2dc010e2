//! Who may use the tracker's HTTP API: bearer tokens, each with a name (what the history
//! records as `http:<name>`) and a role (`read` or `operator`). The settings hold only each
//! token's BLAKE3, never the token: a leaked settings file lets nobody in. A token is 32 random
//! bytes, so a plain hash suffices (nothing to guess, no need for a slow password hash).
//!
//! ```toml
//! [http]
//! read_requires_token = false   # true: GET /api/* needs a read or operator token too
//! [[http.tokens]]
//! name = "alice"
//! role = "operator"
//! hash = "<64 hex digits: BLAKE3 of the token>"   # fleetcast token new alice
//! ```

use serde::Deserialize;

// A token's name and role, and how a token and its settings entry are made, are the API's
// contract (the CLI makes tokens too).
pub use fleetcast_events::tracker::{TokenName, TokenRole, new_token, settings_entry, token_hash};

/// `[http]` of the tracker's settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Reads (`GET /api/*`) need a token too; without it they are open to whoever reaches the
    /// listener (as `/health` and `/metrics` always are).
    pub read_requires_token: bool,
    /// Who may call the API, and as what. None: every action is refused (401).
    pub tokens: Vec<TokenEntry>,
}

impl HttpSettings {
    /// Names and hashes are each unique: a name is who the history says acted, and one token
    /// must not stand for two names.
    pub fn validate(&self) -> Result<(), TokensError> {
        let mut names = std::collections::BTreeSet::new();
        let mut hashes = std::collections::BTreeSet::new();
        for t in &self.tokens {
            if !names.insert(t.name.as_str()) {
                return Err(TokensError::NameTwice(t.name.as_str().to_string()));
            }
            if !hashes.insert(t.hash.0.to_hex().to_string()) {
                return Err(TokensError::SameHash(t.name.as_str().to_string()));
            }
        }
        Ok(())
    }

    /// The entry whose token `presented` is, comparing hashes in constant time (and every
    /// entry, so the time taken does not tell which one matched).
    pub fn identify(&self, presented: &str) -> Option<&TokenEntry> {
        let hash = blake3::hash(presented.as_bytes());
        let mut found = None;
        for entry in &self.tokens {
            // blake3::Hash's equality is constant-time.
            if entry.hash.0 == hash {
                found = Some(entry);
            }
        }
        found
    }
}

/// Why `http.tokens` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokensError {
    #[error("token name {0:?} is given twice")]
    NameTwice(String),
    /// Two names for one token: the history could not say who acted.
    #[error("token {0:?} has the hash of another token")]
    SameHash(String),
}

/// One token's entry: its name, role and hash.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: TokenName,
    pub role: TokenRole,
    pub hash: TokenHash,
}

/// The BLAKE3 of a token, given as 64 hex digits.
#[derive(Debug, Clone)]
pub struct TokenHash(blake3::Hash);

/// A token hash that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("token hash: 64 hex digits, the BLAKE3 of the token (fleetcast token new)")]
pub struct NotATokenHash;

impl TryFrom<&str> for TokenHash {
    type Error = NotATokenHash;
    fn try_from(hex: &str) -> Result<Self, NotATokenHash> {
        // What is wrong with the digits adds nothing to what they should be.
        blake3::Hash::from_hex(hex.trim())
            .map(TokenHash)
            .map_err(|_| NotATokenHash)
    }
}

impl<'de> Deserialize<'de> for TokenHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        TokenHash::try_from(String::deserialize(d)?.as_str()).map_err(serde::de::Error::custom)
    }
}

/// The token of an `Authorization: Bearer <token>` header value; `None` for any other scheme.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml_text: &str) -> Result<HttpSettings, toml::de::Error> {
        #[derive(Deserialize)]
        struct Wrapper {
            http: HttpSettings,
        }
        toml::from_str::<Wrapper>(toml_text).map(|w| w.http)
    }

    #[test]
    fn a_new_tokens_settings_entry_identifies_it_and_no_other() {
        let token = new_token().expect("token");
        assert_eq!(token.len(), 64);
        assert!(token.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(token, new_token().expect("another"), "random");
        let name = TokenName::try_from("alice".to_string()).expect("name");
        let text = settings_entry(&name, TokenRole::Operator, &token);
        assert!(
            !text.contains(&token),
            "the token itself is never written: {text}"
        );
        let http =
            settings(&format!("[http]\nread_requires_token = true\n{text}")).expect("parses");
        assert!(http.read_requires_token);
        http.validate().expect("valid");
        let found = http.identify(&token).expect("identified");
        assert_eq!(
            (found.name.as_str(), found.role),
            ("alice", TokenRole::Operator)
        );
        assert!(http.identify(&new_token().expect("other")).is_none());
        assert!(http.identify("").is_none());
        // Its hash is not a token.
        assert!(http.identify(&token_hash(&token)).is_none());
    }

    #[test]
    fn bad_names_hashes_roles_and_duplicates_are_refused() {
        let hash = token_hash("t1");
        let entry = |name: &str, role: &str, hash: &str| {
            format!("[[http.tokens]]\nname = \"{name}\"\nrole = \"{role}\"\nhash = \"{hash}\"\n")
        };
        for (text, why) in [
            (entry("bob smith", "read", &hash), "token name"),
            (entry("", "read", &hash), "token name"),
            (entry("bob", "admin", &hash), "unknown variant"),
            (entry("bob", "read", "abc"), "64 hex digits"),
            (entry("bob", "read", &"zz".repeat(32)), "64 hex digits"),
            (
                format!("{}token = \"t1\"\n", entry("bob", "read", &hash)),
                "unknown field",
            ),
        ] {
            let err = settings(&text).expect_err(&text).to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
        let twice = settings(&format!(
            "{}{}",
            entry("bob", "read", &hash),
            entry("bob", "operator", &token_hash("t2"))
        ))
        .expect("parses");
        assert_eq!(twice.validate(), Err(TokensError::NameTwice("bob".into())));
        assert!(
            twice
                .validate()
                .is_err_and(|e| e.to_string().contains("twice"))
        );
        let same = settings(&format!(
            "{}{}",
            entry("bob", "read", &hash),
            entry("carol", "operator", &hash)
        ))
        .expect("parses");
        assert_eq!(same.validate(), Err(TokensError::SameHash("carol".into())));
        assert!(
            same.validate()
                .is_err_and(|e| e.to_string().contains("another token"))
        );
    }

    #[test]
    fn only_a_bearer_header_carries_a_token() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc"), None);
    }
}
