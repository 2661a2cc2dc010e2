//! `fleetcast root`: the offline root of trust. An operator writes a root (`new`), each root
//! key holder signs it on their own machine (`sign`), and one publishes it (`publish`), which
//! first checks it against the root before it exactly as agents will.

use std::path::Path;
use std::time::Duration;

use crate::CliBus;
use anyhow::{Context, bail};
use fleetcast_events::names::root_key;
use fleetcast_events::{PublicKey, Role, Root, SecretKey, SignedMetadata, TrustedRoot};
use time::OffsetDateTime;

/// A role's keys from arguments: public key files (`fleetcast keygen` writes `<name>.pub`) or
/// the base64 text itself.
pub fn role(keys: &[String], threshold: usize) -> anyhow::Result<Role> {
    let mut texts = Vec::new();
    for key in keys {
        let text = if Path::new(key).is_file() {
            std::fs::read_to_string(key).with_context(|| format!("reading {key}"))?
        } else {
            key.clone()
        };
        let parsed = PublicKey::from_text(&text).with_context(|| format!("public key {key}"))?;
        texts.push(parsed.to_text().trim().to_string());
    }
    let role = Role {
        keys: texts,
        threshold,
    };
    role.trusted()?;
    Ok(role)
}

/// A new, unsigned root.
pub fn new_root(
    version: u64,
    root: Role,
    signing: Role,
    valid_for: Duration,
) -> anyhow::Result<SignedMetadata> {
    if version == 0 {
        bail!("root versions start at 1");
    }
    let now = OffsetDateTime::now_utc();
    let root = Root {
        version,
        expires: now.replace_nanosecond(0).unwrap_or(now) + valid_for,
        root,
        signing,
    };
    Ok(SignedMetadata {
        signed: serde_json::to_string(&root)?,
        signatures: Vec::new(),
    })
}

pub fn read(path: &Path) -> anyhow::Result<SignedMetadata> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not a root", path.display()))
}

pub fn write(path: &Path, signed: &SignedMetadata) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(signed)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Adds the signature of the secret key in `key_file`.
pub fn sign(signed: &mut SignedMetadata, key_file: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(key_file)
        .with_context(|| format!("reading {}", key_file.display()))?;
    let key = SecretKey::from_text(&text).with_context(|| key_file.display().to_string())?;
    let _: Root = signed.unverified()?;
    signed.add_signature(&key);
    Ok(key.public().id())
}

/// Checks `signed` as an agent will, against the root published before it (the first root only
/// against itself).
pub fn check(
    previous: Option<&TrustedRoot>,
    signed: &SignedMetadata,
) -> anyhow::Result<TrustedRoot> {
    let trusted = match previous {
        None => TrustedRoot::bootstrap(signed),
        Some(previous) => previous.next(signed),
    };
    trusted.map_err(|e| anyhow::anyhow!("verifiers would refuse this root: {e}"))
}

/// The newest published root, walked from `root.1` and checked link by link.
pub async fn published(bus: &CliBus) -> anyhow::Result<Option<TrustedRoot>> {
    let mut current: Option<TrustedRoot> = None;
    loop {
        let version = match &current {
            None => 1,
            Some(r) => match r.version().checked_add(1) {
                Some(v) => v,
                None => return Ok(current),
            },
        };
        let key = root_key(version);
        let Some(bytes) = bus
            .trust()
            .await?
            .get(&key)
            .await
            .with_context(|| key.clone())?
        else {
            return Ok(current);
        };
        let signed: SignedMetadata =
            serde_json::from_slice(&bytes).with_context(|| format!("published {key}"))?;
        current =
            Some(check(current.as_ref(), &signed).with_context(|| format!("published {key}"))?);
    }
}

/// Publishes the next root, after checking it as agents will. A published version is never
/// replaced; publishing the very same root again does nothing (so a deployment step can run on
/// every start). Returns the newest published root and whether this call published it.
pub async fn publish(bus: &CliBus, signed: &SignedMetadata) -> anyhow::Result<(TrustedRoot, bool)> {
    let root: Root = signed.unverified()?;
    let previous = published(bus).await?;
    if let Some(newest) = &previous
        && root.version <= newest.version()
    {
        let key = root_key(root.version);
        let same = bus
            .trust()
            .await?
            .get(&key)
            .await
            .with_context(|| key.clone())?
            .and_then(|bytes| serde_json::from_slice::<SignedMetadata>(&bytes).ok())
            .is_some_and(|there| there.signed == signed.signed);
        if same {
            return Ok((newest.clone(), false));
        }
    }
    let expected = previous
        .as_ref()
        .map_or(Some(1), |r| r.version().checked_add(1))
        .context("the published root has the largest version; none can follow it")?;
    if root.version != expected {
        bail!(
            "this is root version {}, the next to publish is {expected}",
            root.version
        );
    }
    let trusted = check(previous.as_ref(), signed)?;
    let bytes = serde_json::to_vec(signed)?;
    bus.trust()
        .await?
        .create(root_key(root.version), bytes.into())
        .await
        .with_context(|| format!("publishing root version {}", root.version))?;
    Ok((trusted, true))
}

/// A root for people: version, expiry, each role's key ids and threshold.
pub fn describe(root: &Root) -> String {
    let ids = |role: &Role| {
        role.keys
            .iter()
            .map(|k| PublicKey::from_text(k).map_or_else(|_| "(invalid)".into(), |k| k.id()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "root version {}, expires {}\n  root keys ({} of {}): {}\n  signing keys ({} of {}): {}",
        root.version,
        // RFC 3339 to the second (`2027-12-06T10:28:10Z`), not the Debug-like default.
        root.expires
            .replace_nanosecond(0)
            .unwrap_or(root.expires)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| root.expires.to_string()),
        root.root.threshold,
        root.root.keys.len(),
        ids(&root.root),
        root.signing.threshold,
        root.signing.keys.len(),
        ids(&root.signing),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_is_described_with_its_expiry_to_the_second() {
        let root = Root {
            version: 2,
            expires: time::macros::datetime!(2027-12-06 10:28:10.123456789 UTC),
            root: Role {
                keys: vec!["not a key".into()],
                threshold: 1,
            },
            signing: Role {
                keys: Vec::new(),
                threshold: 1,
            },
        };
        let text = describe(&root);
        assert!(
            text.starts_with("root version 2, expires 2027-12-06T10:28:10Z\n"),
            "{text}"
        );
        assert!(text.contains("root keys (1 of 1): (invalid)"), "{text}");
    }
}
