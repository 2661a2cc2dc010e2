//! The root of trust, after The Update Framework. An offline set of root keys signs the
//! [`Root`]: which keys may sign releases and timestamps, and how many of them must. Each new
//! root is signed by a threshold of the previous root's keys *and* of its own, so signing keys
//! are rotated and revoked, and the root keys themselves rotate, without touching a verifier's
//! config: it only ever needs its first root. The signer's short-lived [`Timestamp`] tells a
//! verifier how fresh its view is, so metadata withheld by the broker is noticed.
//!
//! Like manifests, metadata travels as the exact JSON text that was signed; it is parsed only
//! after the signatures are checked.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::keys::{
    PublicKey, SecretKey, Signature, TrustError, TrustedKeys, parse_document, refuse_expired,
};

/// A set of keys and how many of them must sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// Ed25519 public keys, base64 (as `fleetcast keygen` writes them).
    pub keys: Vec<String>,
    pub threshold: usize,
}

impl Role {
    pub fn trusted(&self) -> Result<TrustedKeys, TrustError> {
        let keys = self
            .keys
            .iter()
            .map(|k| PublicKey::from_text(k).map_err(|e| TrustError::Malformed(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        TrustedKeys::with_threshold(keys, self.threshold)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Root {
    /// 1 for the first root; each rotation adds one.
    pub version: u64,
    /// After this instant the root must be replaced: verifiers refuse what its keys signed.
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub expires: OffsetDateTime,
    /// The offline keys that sign roots.
    pub root: Role,
    /// The keys that sign release manifests, rollback directives and timestamps (the signer's).
    pub signing: Role,
}

/// The signer's periodic statement that its view is current: verifiers compare `issued` with
/// their clock and report themselves as having stale metadata when it gets too old.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Timestamp {
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub issued: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub expires: OffsetDateTime,
    /// The root version the signer signs under (0 when it runs with pinned keys).
    pub root_version: u64,
    /// The newest version signed per app, so a verifier sees what exists even when its
    /// announcements are withheld.
    #[schemars(with = "BTreeMap<String, String>")]
    pub releases: BTreeMap<String, semver::Version>,
}

/// A root or a timestamp: its exact JSON text and the signatures over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignedMetadata {
    pub signed: String,
    pub signatures: Vec<Signature>,
}

impl SignedMetadata {
    pub fn sign<T: Serialize>(value: &T, keys: &[&SecretKey]) -> Result<Self, serde_json::Error> {
        let signed = serde_json::to_string(value)?;
        let signatures = keys.iter().map(|k| Signature::new(k, &signed)).collect();
        Ok(SignedMetadata { signed, signatures })
    }

    /// Another key holder's signature (roots are signed by several people, one at a time).
    pub fn add_signature(&mut self, key: &SecretKey) {
        let id = key.public().id();
        self.signatures.retain(|s| s.key_id != id);
        self.signatures.push(Signature::new(key, &self.signed));
    }

    fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, TrustError> {
        parse_document(&self.signed)
    }

    /// Parses the text without checking a signature: only for showing a document to a person
    /// (the CLI) or for learning which keys it names before they are checked.
    pub fn unverified<T: serde::de::DeserializeOwned>(&self) -> Result<T, TrustError> {
        self.parse()
    }

    /// A timestamp signed by a threshold of `keys`, not expired.
    pub fn verify_timestamp(
        &self,
        keys: &TrustedKeys,
        now: OffsetDateTime,
    ) -> Result<Timestamp, TrustError> {
        let timestamp: Timestamp = keys.parse_signed(&self.signed, &self.signatures)?;
        refuse_expired(timestamp.expires, now)?;
        Ok(timestamp)
    }
}

/// A root whose signatures were checked, with the keys of its two roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedRoot {
    root: Root,
    signed: SignedMetadata,
    root_keys: TrustedKeys,
    signing_keys: TrustedKeys,
}

impl TrustedRoot {
    /// The root a verifier starts from (shipped with its config, or the one it persisted): it
    /// must be signed by a threshold of its own root keys. Its expiry is not checked here: an
    /// expired root still anchors the chain to newer ones ([`TrustedRoot::signing_keys`] checks
    /// it before use).
    pub fn bootstrap(signed: &SignedMetadata) -> Result<Self, TrustError> {
        let root: Root = signed.parse()?;
        TrustedRoot::checked(root, signed)
    }

    /// The next root: exactly one version above this one, signed by a threshold of this root's
    /// keys (so only the current key holders can rotate) and of its own (so its new keys are
    /// really held).
    pub fn next(&self, signed: &SignedMetadata) -> Result<Self, TrustError> {
        let root: Root = self
            .root_keys
            .parse_signed(&signed.signed, &signed.signatures)?;
        // A root at the largest version has no successor (found by fuzzing: the sum overflowed).
        let Some(expected) = self.root.version.checked_add(1) else {
            return Err(TrustError::Malformed(format!(
                "root version {} has no successor",
                self.root.version
            )));
        };
        if root.version != expected {
            return Err(TrustError::RootVersion {
                expected,
                found: root.version,
            });
        }
        TrustedRoot::checked(root, signed)
    }

    fn checked(root: Root, signed: &SignedMetadata) -> Result<Self, TrustError> {
        let root_keys = root.root.trusted()?;
        let signing_keys = root.signing.trusted()?;
        root_keys.check(&signed.signed, &signed.signatures)?;
        Ok(TrustedRoot {
            root,
            signed: signed.clone(),
            root_keys,
            signing_keys,
        })
    }

    pub fn version(&self) -> u64 {
        self.root.version
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    pub fn signed(&self) -> &SignedMetadata {
        &self.signed
    }

    /// The keys manifests and timestamps must be signed with, while this root is valid: an
    /// expired root trusts nothing, so a stolen old signing key cannot outlive it.
    pub fn signing_keys(&self, now: OffsetDateTime) -> Result<&TrustedKeys, TrustError> {
        if now > self.root.expires {
            return Err(TrustError::RootExpired {
                version: self.root.version,
                at: self.root.expires.to_string(),
            });
        }
        Ok(&self.signing_keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    fn keys(n: usize) -> Vec<SecretKey> {
        (0..n)
            .map(|_| SecretKey::generate().expect("key"))
            .collect()
    }

    fn role(keys: &[SecretKey], threshold: usize) -> Role {
        Role {
            keys: keys.iter().map(|k| k.public().to_text()).collect(),
            threshold,
        }
    }

    fn root(version: u64, root_keys: &[SecretKey], signing: &[SecretKey]) -> Root {
        Root {
            version,
            expires: OffsetDateTime::now_utc() + Duration::days(365),
            root: role(root_keys, 2),
            signing: role(signing, 1),
        }
    }

    fn sign(root: &Root, by: &[&SecretKey]) -> SignedMetadata {
        SignedMetadata::sign(root, by).expect("sign")
    }

    #[test]
    fn a_root_needs_its_threshold_of_root_keys() {
        let rk = keys(3);
        let sk = keys(1);
        let r1 = root(1, &rk, &sk);
        assert!(matches!(
            TrustedRoot::bootstrap(&sign(&r1, &[&rk[0]])),
            Err(TrustError::BelowThreshold {
                valid: 1,
                needed: 2
            })
        ));
        let trusted = TrustedRoot::bootstrap(&sign(&r1, &[&rk[0], &rk[2]])).expect("root");
        let now = OffsetDateTime::now_utc();
        assert_eq!(trusted.signing_keys(now).expect("valid").threshold(), 1);
        // Signed by the signing key instead of root keys: not a root.
        assert!(TrustedRoot::bootstrap(&sign(&r1, &[&sk[0]])).is_err());
    }

    #[test]
    fn rotation_needs_the_old_and_the_new_root_keys_and_the_next_version() {
        let old = keys(3);
        let new = keys(3);
        let signing = keys(2);
        let r1 = TrustedRoot::bootstrap(&sign(&root(1, &old, &signing[..1]), &[&old[0], &old[1]]))
            .expect("r1");
        // Root keys rotated to a new set, and the first signing key revoked.
        let r2 = root(2, &new, &signing[1..]);
        let by_old_only = sign(&r2, &[&old[0], &old[1]]);
        assert!(matches!(
            r1.next(&by_old_only),
            Err(TrustError::UnknownKey(_))
        ));
        let by_new_only = sign(&r2, &[&new[0], &new[1]]);
        assert!(matches!(
            r1.next(&by_new_only),
            Err(TrustError::UnknownKey(_))
        ));
        let by_both = sign(&r2, &[&old[0], &old[2], &new[1], &new[2]]);
        let trusted2 = r1.next(&by_both).expect("rotated");
        let now = OffsetDateTime::now_utc();
        let keys2 = trusted2.signing_keys(now).expect("valid");
        assert!(keys2.get(&signing[0].public().id()).is_none(), "revoked");
        assert!(keys2.get(&signing[1].public().id()).is_some());
        // A replayed or skipped version is refused.
        assert_eq!(
            trusted2.next(&by_both),
            Err(TrustError::RootVersion {
                expected: 3,
                found: 2
            })
        );
    }

    #[test]
    fn the_largest_root_version_has_no_successor() {
        let rk = keys(2);
        let sk = keys(1);
        let last = sign(&root(u64::MAX, &rk, &sk), &[&rk[0], &rk[1]]);
        let trusted = TrustedRoot::bootstrap(&last).expect("root");
        assert!(matches!(trusted.next(&last), Err(TrustError::Malformed(_))));
    }

    #[test]
    fn expired_root_trusts_nothing_and_timestamps_verify() {
        let rk = keys(2);
        let sk = keys(1);
        let mut r = root(1, &rk, &sk);
        r.expires = OffsetDateTime::now_utc() - Duration::days(1);
        let trusted = TrustedRoot::bootstrap(&sign(&r, &[&rk[0], &rk[1]])).expect("root");
        let now = OffsetDateTime::now_utc();
        assert!(matches!(
            trusted.signing_keys(now),
            Err(TrustError::RootExpired { version: 1, .. })
        ));

        let ts = Timestamp {
            issued: now,
            expires: now + Duration::minutes(10),
            root_version: 1,
            releases: BTreeMap::from([("app".into(), semver::Version::new(1, 2, 3))]),
        };
        let signed = SignedMetadata::sign(&ts, &[&sk[0]]).expect("sign");
        let keys = TrustedKeys::new(vec![sk[0].public()]);
        assert_eq!(signed.verify_timestamp(&keys, now), Ok(ts));
        assert!(matches!(
            signed.verify_timestamp(&keys, now + Duration::minutes(11)),
            Err(TrustError::Expired(_))
        ));
        assert!(matches!(
            signed.verify_timestamp(&TrustedKeys::new(vec![rk[0].public()]), now),
            Err(TrustError::UnknownKey(_))
        ));
    }
}
