//! Ed25519 key files. A key file holds one line: the base64 of the 32-byte secret seed or public
//! key. A key is named by its id, the first 16 hex digits of the BLAKE3 of the public key.

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};

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
        self.0.verify_strict(message, &sig).is_ok() && self.0.verify(message, &sig).is_ok()
    }
}

/// The public keys a verifier accepts signatures from (pinned in its config).
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys(Vec<PublicKey>);

impl TrustedKeys {
    pub fn new(keys: Vec<PublicKey>) -> Self {
        TrustedKeys(keys)
    }

    pub fn get(&self, id: &str) -> Option<&PublicKey> {
        self.0.iter().find(|k| k.id() == id)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
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
}
