//! Ed25519 key files. A key file holds one line: the base64 of the 32-byte secret seed or public
//! key. A key is named by its id, the first 16 hex digits of the BLAKE3 of the public key.

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("key must be 32 bytes, found {0}")]
    Length(usize),
    #[error("not a valid Ed25519 public key")]
    InvalidPublicKey,
    #[error("no randomness available to generate a key: {0}")]
    Random(String),
}

pub struct SecretKey(SigningKey);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

fn decode32(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = B64.decode(text.trim())?;
    let len = bytes.len();
    bytes.try_into().map_err(|_| KeyError::Length(len))
}

impl SecretKey {
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        Ok(SecretKey(SigningKey::from_bytes(&decode32(text)?)))
    }

    pub fn to_text(&self) -> String {
        B64.encode(self.0.to_bytes()) + "\n"
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
}

impl std::fmt::Debug for SecretKey {
    // Never print the secret, not even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.public().id())
    }
}

impl PublicKey {
    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        VerifyingKey::from_bytes(&decode32(text)?)
            .map(PublicKey)
            .map_err(|_| KeyError::InvalidPublicKey)
    }

    pub fn to_text(&self) -> String {
        B64.encode(self.0.to_bytes()) + "\n"
    }

    pub fn id(&self) -> String {
        blake3::hash(self.0.as_bytes()).to_hex()[..16].to_string()
    }

    /// Strict verification: rejects the malleable and small-order forms plain `verify` allows.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(bytes) = <[u8; 64]>::try_from(signature) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&bytes);
        // `verify_strict` is `verify` (the same equation) plus the small-order and canonical-R
        // checks: one call, one scalar multiplication.
        self.0.verify_strict(message, &sig).is_ok()
    }
}

/// One signature over a signed document's exact text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    pub key_id: String,
    /// Ed25519 signature of the signed text, base64.
    pub signature: String,
}

impl Signature {
    pub fn new(key: &SecretKey, text: &str) -> Self {
        Signature {
            key_id: key.public().id(),
            signature: B64.encode(key.sign(text.as_bytes())),
        }
    }
}

/// Why signed metadata (a manifest, a root, a timestamp) is not trusted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrustError {
    #[error("unsigned")]
    Unsigned,
    #[error("signed only by keys that are not trusted ({0})")]
    UnknownKey(String),
    #[error("signature by key {0} does not match (tampered or forged)")]
    BadSignature(String),
    #[error("{valid} valid signature(s) from trusted keys, {needed} needed")]
    BelowThreshold { valid: usize, needed: usize },
    #[error("malformed: {0}")]
    Malformed(String),
    /// A root's signing threshold that its keys cannot meet (or that anyone meets).
    #[error("malformed: threshold {threshold} must be between 1 and the {keys} distinct key(s)")]
    Threshold { threshold: usize, keys: usize },
    #[error("expired at {0}")]
    Expired(String),
    #[error("lists an unsafe path: {0}")]
    UnsafePath(String),
    #[error("root version {found} where {expected} was expected")]
    RootVersion { expected: u64, found: u64 },
    #[error("the trusted root (version {version}) expired at {at}; a newer root is needed")]
    RootExpired { version: u64, at: String },
    #[error("timestamp issued at {found} is older than the one already seen ({seen})")]
    TimestampReplayed { found: String, seen: String },
    /// Issued further ahead of the verifier's clock than its tolerance: the verifier's clock is
    /// behind (or the signer's ahead), so expiries cannot be judged.
    #[error(
        "timestamp issued at {issued} is {ahead_s}s ahead of this clock ({now}; tolerance {tolerance_s}s): this host's clock is behind or the signer's ahead"
    )]
    FromTheFuture {
        issued: String,
        now: String,
        ahead_s: i64,
        tolerance_s: u64,
    },
}

/// The public keys a verifier accepts signatures from, and how many of them must sign: pinned
/// in its config (threshold 1), or a role of the trusted root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedKeys {
    /// Each key with its id, computed once: every signature is looked up by id.
    keys: Vec<(String, PublicKey)>,
    threshold: usize,
}

impl Default for TrustedKeys {
    fn default() -> Self {
        TrustedKeys::new(Vec::new())
    }
}

impl TrustedKeys {
    /// Any one of `keys` suffices.
    pub fn new(keys: Vec<PublicKey>) -> Self {
        TrustedKeys {
            keys: keys.into_iter().map(|k| (k.id(), k)).collect(),
            threshold: 1,
        }
    }

    /// `threshold` distinct keys of `keys` must sign; it must be between 1 and their number.
    pub fn with_threshold(keys: Vec<PublicKey>, threshold: usize) -> Result<Self, TrustError> {
        let keys = TrustedKeys::new(keys).keys;
        let mut ids: Vec<&str> = keys.iter().map(|(id, _)| id.as_str()).collect();
        ids.sort();
        ids.dedup();
        if threshold == 0 || threshold > ids.len() {
            return Err(TrustError::Threshold {
                threshold,
                keys: ids.len(),
            });
        }
        Ok(TrustedKeys { keys, threshold })
    }

    pub fn get(&self, id: &str) -> Option<&PublicKey> {
        self.keys.iter().find(|(k, _)| k == id).map(|(_, key)| key)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// Whether at least the threshold of distinct trusted keys signed `text`. Each trusted key
    /// is checked at most once, so a flood of signatures costs no more than the key count.
    pub fn check(&self, text: &str, signatures: &[Signature]) -> Result<(), TrustError> {
        if signatures.is_empty() {
            return Err(TrustError::Unsigned);
        }
        let mut checked: Vec<&str> = Vec::new();
        let mut valid = 0;
        let mut bad = None;
        for sig in signatures {
            let Some(key) = self.get(&sig.key_id) else {
                continue;
            };
            if checked.contains(&sig.key_id.as_str()) {
                continue;
            }
            checked.push(&sig.key_id);
            let ok = B64
                .decode(&sig.signature)
                .is_ok_and(|bytes| key.verify(text.as_bytes(), &bytes));
            if ok {
                valid += 1;
                if valid >= self.threshold {
                    return Ok(());
                }
            } else {
                bad.get_or_insert_with(|| sig.key_id.clone());
            }
        }
        Err(match (valid, bad) {
            (0, Some(id)) => TrustError::BadSignature(id),
            (0, None) => TrustError::UnknownKey(
                signatures
                    .iter()
                    .map(|s| s.key_id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            (valid, _) => TrustError::BelowThreshold {
                valid,
                needed: self.threshold,
            },
        })
    }

    /// `text` as a `T`, once at least the threshold of these keys is found to have signed it:
    /// the signatures are checked first, so nothing unsigned is ever interpreted.
    pub(crate) fn parse_signed<T: serde::de::DeserializeOwned>(
        &self,
        text: &str,
        signatures: &[Signature],
    ) -> Result<T, TrustError> {
        self.check(text, signatures)?;
        parse_document(text)
    }
}

/// A signed document's text (a manifest, a root, a timestamp) as a `T`; `Malformed` if it is not one.
pub(crate) fn parse_document<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, TrustError> {
    serde_json::from_str(text).map_err(|e| TrustError::Malformed(e.to_string()))
}

/// `Expired` once `now` is past a signed document's `expires` (a manifest's, a timestamp's).
pub(crate) fn refuse_expired(
    expires: time::OffsetDateTime,
    now: time::OffsetDateTime,
) -> Result<(), TrustError> {
    if now > expires {
        return Err(TrustError::Expired(expires.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip_and_signature() {
        let sk = SecretKey::generate().expect("key");
        let sk2 = SecretKey::from_text(&sk.to_text()).expect("parse secret");
        let pk = PublicKey::from_text(&sk.public().to_text()).expect("parse public");
        assert_eq!(pk, sk2.public());
        let sig = sk.sign(b"hello");
        assert!(pk.verify(b"hello", &sig));
        assert!(!pk.verify(b"hellO", &sig));
        assert!(!pk.verify(b"hello", &sig[..63]));
    }

    #[test]
    fn bad_key_text() {
        assert!(matches!(
            PublicKey::from_text("!!"),
            Err(KeyError::Base64(_))
        ));
        assert!(matches!(
            PublicKey::from_text("AAAA"),
            Err(KeyError::Length(3))
        ));
    }

    #[test]
    fn threshold_counts_distinct_trusted_keys() {
        let keys: Vec<SecretKey> = (0..3)
            .map(|_| SecretKey::generate().expect("key"))
            .collect();
        let trusted = TrustedKeys::with_threshold(keys.iter().map(SecretKey::public).collect(), 2)
            .expect("threshold");
        let one = vec![Signature::new(&keys[0], "text")];
        assert_eq!(
            trusted.check("text", &one),
            Err(TrustError::BelowThreshold {
                valid: 1,
                needed: 2
            })
        );
        // The same key twice is still one key.
        let twice = vec![one[0].clone(), one[0].clone()];
        assert!(matches!(
            trusted.check("text", &twice),
            Err(TrustError::BelowThreshold { valid: 1, .. })
        ));
        let two = vec![one[0].clone(), Signature::new(&keys[2], "text")];
        assert_eq!(trusted.check("text", &two), Ok(()));
        assert!(matches!(
            trusted.check("other text", &two),
            Err(TrustError::BadSignature(_))
        ));
        assert!(TrustedKeys::with_threshold(vec![keys[0].public(), keys[0].public()], 2).is_err());
        assert!(TrustedKeys::with_threshold(vec![keys[0].public()], 0).is_err());
    }
}
