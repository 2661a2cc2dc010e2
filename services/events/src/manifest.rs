//! The release manifest the signer signs, and the only way to get a usable one back: verify it.
//! It names the release's file tree by its root node (`tree.rs`), so it stays a few hundred
//! bytes whatever the package holds; every node read later is checked against that root.
//!
//! The signature covers the exact manifest bytes carried in the envelope; a verifier checks the
//! signature first and parses afterwards, so no canonical-JSON rules are needed and nothing
//! unsigned is ever interpreted.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ident::AppName;
use crate::keys::{SecretKey, Signature, TrustError, TrustedKeys, refuse_expired};
use crate::tree::{Built, Hash32, NodeRef, TreeError, TreeFile};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub app: AppName,
    #[schemars(with = "String")]
    pub version: semver::Version,
    pub tree: TreeRoot,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub created: OffsetDateTime,
    /// After this instant verifiers refuse the manifest.
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub expires: OffsetDateTime,
    /// Set on a signed rollback directive: this (older) version replaces every version up to
    /// and including `rollback_from`. Agents accept it although it is older than what they
    /// accepted, withdraw the versions it replaces, and refuse it once they accepted a version
    /// above `rollback_from` (a replayed directive cannot downgrade them later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub rollback_from: Option<semver::Version>,
}

/// The root of a release's file tree, with the totals it must add up to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TreeRoot {
    /// BLAKE3 of the root node's bytes, lowercase hex.
    pub root: String,
    /// The root node's length in bytes.
    pub len: u32,
    /// How many files (and links) the release has.
    pub files: u64,
    /// Sum of the files' sizes.
    pub bytes: u64,
}

impl TreeRoot {
    pub fn of(built: &Built, files: &[TreeFile]) -> Self {
        TreeRoot {
            root: built.root.hash.to_hex(),
            len: built.root.len,
            files: files.len() as u64,
            bytes: files.iter().map(|f| f.entry.size).sum(),
        }
    }

    pub fn node(&self) -> Result<NodeRef, TreeError> {
        Ok(NodeRef {
            hash: Hash32::from_hex(&self.root)?,
            len: self.len,
        })
    }
}

/// One file as the tree holds it (in memory; on the wire it is a leaf item, `tree.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative path inside the release, `/`-separated, never absolute, never `..`.
    pub path: String,
    /// Unix permission bits (e.g. 0o755).
    pub mode: u32,
    pub size: u64,
    /// BLAKE3 of the file's content, lowercase hex.
    pub blake3: String,
    /// For a symbolic link: its target, relative and inside the release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    /// The manifest as the exact JSON text that was signed.
    pub manifest: String,
    pub signatures: Vec<Signature>,
}

/// A manifest whose signature and expiry were checked. Only [`SignedManifest::verify`] makes one,
/// so code that takes a `VerifiedManifest` cannot be handed unverified metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedManifest(Manifest);

impl std::ops::Deref for VerifiedManifest {
    type Target = Manifest;
    fn deref(&self) -> &Manifest {
        &self.0
    }
}

impl SignedManifest {
    /// Signed by every key of `keys` (as many as the trusted root's signing threshold asks).
    pub fn sign(manifest: &Manifest, keys: &[&SecretKey]) -> Result<Self, serde_json::Error> {
        let text = serde_json::to_string(manifest)?;
        let signatures = keys.iter().map(|k| Signature::new(k, &text)).collect();
        Ok(SignedManifest {
            manifest: text,
            signatures,
        })
    }

    pub fn verify(
        &self,
        keys: &TrustedKeys,
        now: OffsetDateTime,
    ) -> Result<VerifiedManifest, TrustError> {
        let manifest: Manifest = keys.parse_signed(&self.manifest, &self.signatures)?;
        refuse_expired(manifest.expires, now)?;
        // Each path is checked as the tree is read (`tree::Walk`), against this root.
        manifest
            .tree
            .node()
            .map_err(|e| TrustError::Malformed(e.to_string()))?;
        Ok(VerifiedManifest(manifest))
    }
}

/// A path that stays inside the directory it is joined to: relative, `/`-separated, no empty,
/// `.` or `..` components, no backslashes or NULs (which other tools read as separators or ends).
pub fn check_relative_path(path: &str) -> Result<(), UnsafePath> {
    let unsafe_path = |why: &'static str| {
        Err(UnsafePath {
            path: path.to_string(),
            why,
        })
    };
    if path.is_empty() {
        return unsafe_path("is empty");
    }
    if path.starts_with('/') || path.contains('\\') || path.contains('\0') {
        return unsafe_path("is absolute or has a forbidden character");
    }
    if path.len() > 1 && path.as_bytes().get(1) == Some(&b':') {
        return unsafe_path("looks like a drive path");
    }
    for part in path.trim_end_matches('/').split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return unsafe_path("has an empty, '.' or '..' component");
        }
    }
    Ok(())
}

/// A path that could leave the directory it is joined to (see [`check_relative_path`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path:?} {why}")]
pub struct UnsafePath {
    pub path: String,
    pub why: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;
    use time::Duration;

    fn manifest(now: OffsetDateTime) -> Manifest {
        Manifest {
            rollback_from: None,
            app: crate::AppName::from_static("collector"),
            version: semver::Version::new(2, 0, 0),
            tree: TreeRoot {
                root: blake3::hash(b"root").to_hex().to_string(),
                len: 100,
                files: 1,
                bytes: 3,
            },
            created: now,
            expires: now + Duration::days(30),
        }
    }

    fn setup() -> (SecretKey, TrustedKeys, OffsetDateTime) {
        let key = SecretKey::generate().expect("key");
        let trusted = TrustedKeys::new(vec![key.public()]);
        (key, trusted, OffsetDateTime::now_utc())
    }

    #[test]
    fn signed_manifest_verifies() {
        let (key, trusted, now) = setup();
        let signed = SignedManifest::sign(&manifest(now), &[&key]).expect("sign");
        let verified = signed.verify(&trusted, now).expect("verify");
        assert_eq!(*verified, manifest(now));
    }

    #[test]
    fn unsigned_tampered_unknown_expired_are_refused() {
        let (key, trusted, now) = setup();
        let signed = SignedManifest::sign(&manifest(now), &[&key]).expect("sign");

        let mut unsigned = signed.clone();
        unsigned.signatures.clear();
        assert_eq!(unsigned.verify(&trusted, now), Err(TrustError::Unsigned));

        let mut tampered = signed.clone();
        tampered.manifest = tampered.manifest.replace("2.0.0", "2.0.1");
        assert!(matches!(
            tampered.verify(&trusted, now),
            Err(TrustError::BadSignature(_))
        ));

        let other = TrustedKeys::new(vec![SecretKey::generate().expect("key").public()]);
        assert!(matches!(
            signed.verify(&other, now),
            Err(TrustError::UnknownKey(_))
        ));

        let later = now + Duration::days(31);
        assert!(matches!(
            signed.verify(&trusted, later),
            Err(TrustError::Expired(_))
        ));
    }

    #[test]
    fn a_root_that_is_no_hash_is_refused() {
        let (key, trusted, now) = setup();
        let mut m = manifest(now);
        m.tree.root = "not hex".into();
        let signed = SignedManifest::sign(&m, &[&key]).expect("sign");
        assert!(matches!(
            signed.verify(&trusted, now),
            Err(TrustError::Malformed(_))
        ));
    }
}
