//! The file manifest the signer signs, and the only way to get a usable one back: verify it.
//!
//! The signature covers the exact manifest bytes carried in the envelope; a verifier checks the
//! signature first and parses afterwards, so no canonical-JSON rules are needed and nothing
//! unsigned is ever interpreted.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::keys::{SecretKey, Signature, TrustError, TrustedKeys};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub app: String,
    #[schemars(with = "String")]
    pub version: semver::Version,
    pub files: Vec<FileEntry>,
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
        keys.check(&self.manifest, &self.signatures)?;
        let manifest: Manifest = serde_json::from_str(&self.manifest)
            .map_err(|e| TrustError::Malformed(e.to_string()))?;
        if now > manifest.expires {
            return Err(TrustError::Expired(manifest.expires.to_string()));
        }
        crate::names::validate_app_name(&manifest.app).map_err(TrustError::Malformed)?;
        let mut seen = std::collections::HashSet::new();
        for file in &manifest.files {
            check_relative_path(&file.path).map_err(TrustError::UnsafePath)?;
            if !seen.insert(file.path.as_str()) {
                return Err(TrustError::UnsafePath(format!(
                    "{} listed twice",
                    file.path
                )));
            }
        }
        Ok(VerifiedManifest(manifest))
    }
}

/// A path that stays inside the directory it is joined to: relative, `/`-separated, no empty,
/// `.` or `..` components, no backslashes or NULs (which other tools read as separators or ends).
pub fn check_relative_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("empty path".into());
    }
    if path.starts_with('/') || path.contains('\\') || path.contains('\0') {
        return Err(format!("{path:?} is absolute or has a forbidden character"));
    }
    if path.len() > 1 && path.as_bytes().get(1) == Some(&b':') {
        return Err(format!("{path:?} looks like a drive path"));
    }
    for part in path.trim_end_matches('/').split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(format!("{path:?} has an empty, '.' or '..' component"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;
    use time::Duration;

    fn manifest(now: OffsetDateTime) -> Manifest {
        Manifest {
            rollback_from: None,
            app: "collector".into(),
            version: semver::Version::new(2, 0, 0),
            files: vec![FileEntry {
                path: "bin/collector".into(),
                mode: 0o755,
                size: 3,
                blake3: blake3::hash(b"abc").to_hex().to_string(),
                link: None,
            }],
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
    fn unsafe_paths_in_a_signed_manifest_are_refused() {
        let (key, trusted, now) = setup();
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "a/../../b",
            "a//b",
            "c:\\x",
            "a\\b",
        ] {
            let mut m = manifest(now);
            m.files[0].path = bad.into();
            let signed = SignedManifest::sign(&m, &[&key]).expect("sign");
            assert!(
                matches!(signed.verify(&trusted, now), Err(TrustError::UnsafePath(_))),
                "{bad}"
            );
        }
    }
}
