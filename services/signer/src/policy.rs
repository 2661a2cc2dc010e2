//! The signer's policy, decided without IO (and tested without NATS): whether a detected
//! package is signed, announced again, or refused, and why; and what a rollback request
//! re-signs, or why not. `lib.rs` reads what the policy needs (the last release signed for the
//! app, the release record rolled back to), asks, and carries the verdict out.

use std::time::Duration;

use fleetcast_events::v1::{
    PackageDetected, RejectCode, Rejection, ReleaseRecord, ReleaseSigned, ReleaseState,
    RollbackRequested,
};
use fleetcast_events::{Manifest, TrustedKeys};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::settings::Signs;

/// The signer's memory per app (in its own bucket): what it signed last, so "strictly newer" is
/// enforced across restarts and a redelivered event re-announces instead of being refused.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct LastSigned {
    pub(crate) version: semver::Version,
    pub(crate) signed: ReleaseSigned,
}

/// What to do with a detected package.
#[derive(Debug, PartialEq)]
pub(crate) enum Verdict<'a> {
    /// It is what was signed last (a redelivery after signing): announce that again.
    AnnounceAgain(&'a ReleaseSigned),
    /// Refused, for this reason; nothing is signed.
    Refuse(Rejection),
    /// Read the archive, build its tree and sign it.
    Sign,
}

/// The policy for `event` (whose app name is valid: it was checked as it was decoded, and
/// becomes a key of the signer's bucket), given what was signed last for its app and which apps
/// this signer signs: a version must be strictly newer than the last one signed, and the app
/// one it may sign.
pub(crate) fn judge<'a>(
    event: &PackageDetected,
    last: Option<&'a LastSigned>,
    signs: &Signs,
) -> Verdict<'a> {
    if let Some(last) = last {
        if last.version == event.version && last.signed.blake3 == event.blake3 {
            return Verdict::AnnounceAgain(&last.signed);
        }
        if event.version <= last.version {
            return Verdict::Refuse(Rejection {
                code: RejectCode::VersionNotNewer,
                message: format!(
                    "version {} is not newer than {}, the last one signed for {}",
                    event.version, last.version, event.app
                ),
            });
        }
    }
    if !signs.allows(&event.app) {
        let message = match signs {
            Signs::Nothing => format!(
                "app {:?}: the signer's known_apps is empty, so it signs no app (list the \
                 apps it may sign, or \"*\" for any)",
                event.app
            ),
            _ => format!("app {:?} is not in the signer's known_apps", event.app),
        };
        return Verdict::Refuse(Rejection {
            code: RejectCode::UnknownApp,
            message,
        });
    }
    Verdict::Sign
}

/// The policy for a rollback request: the manifest to sign (the stored manifest of `to`,
/// with `rollback_from = from` and a short expiry from `now`), or why not.
///
/// `from` bounds what the directive withdraws and becomes every agent's highest accepted
/// version: it must be `latest`, the latest version this signer signed for the app (its own
/// record, not the request's word), so a typo such as 99.0.0 cannot block every release below
/// it. `to` must be an earlier version, stored (`target`: its release record), and signed by
/// this signer (`ours`: its keys): only what it signed is re-signed.
pub(crate) fn judge_rollback(
    request: &RollbackRequested,
    latest: Option<&semver::Version>,
    target: Option<ReleaseRecord>,
    ours: &TrustedKeys,
    now: OffsetDateTime,
    ttl: Duration,
) -> Result<Manifest, Rejection> {
    let invalid = |message: String| Rejection {
        code: RejectCode::InvalidEvent,
        message,
    };
    if request.to >= request.from {
        return Err(invalid(format!(
            "a rollback goes to an earlier version: {} is not before {}",
            request.to, request.from
        )));
    }
    if latest != Some(&request.from) {
        let latest = latest.map_or_else(|| "none".to_string(), |v| v.to_string());
        return Err(Rejection {
            code: RejectCode::RollbackFromNotLatest,
            message: format!(
                "a rollback of {} replaces versions up to {}, but the latest version signed is {latest}",
                request.app, request.from
            ),
        });
    }
    let Some(stored) = target
        .filter(|r| r.state == ReleaseState::Stored)
        .and_then(|r| r.manifest)
    else {
        return Err(invalid(format!(
            "{} {} is not a stored release",
            request.app, request.to
        )));
    };
    let verified = stored
        .verify(ours, now)
        .map_err(|e| invalid(format!("stored manifest of {}: {e}", request.to)))?;
    let mut manifest: Manifest = (*verified).clone();
    manifest.rollback_from = Some(request.from.clone());
    manifest.created = now;
    manifest.expires = now + ttl;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use fleetcast_events::v1::PackageSource;
    use fleetcast_events::{AppName, SignedManifest};

    use super::*;

    fn detected(app: &str, version: &str, blake3: &str) -> PackageDetected {
        PackageDetected {
            app: AppName::try_from(app).expect("name"),
            version: version.parse().expect("version"),
            object: format!("{app}-{version}.zip"),
            size: 1,
            blake3: blake3.into(),
            source: PackageSource::Ci { published_by: None },
        }
    }

    fn last(version: &str, blake3: &str) -> LastSigned {
        LastSigned {
            version: version.parse().expect("version"),
            signed: ReleaseSigned {
                app: AppName::from_static("web"),
                version: version.parse().expect("version"),
                object: format!("web-{version}.zip"),
                blake3: blake3.into(),
                manifest: SignedManifest {
                    manifest: String::new(),
                    signatures: Vec::new(),
                },
            },
        }
    }

    fn refused(verdict: Verdict<'_>) -> (RejectCode, String) {
        match verdict {
            Verdict::Refuse(r) => (r.code, r.message),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_new_version_of_an_app_it_signs_is_signed() {
        let any = Signs::Any;
        assert_eq!(
            judge(&detected("web", "1.0.0", "a"), None, &any),
            Verdict::Sign
        );
        let before = last("1.0.0", "a");
        let event = detected("web", "1.0.1", "b");
        assert_eq!(judge(&event, Some(&before), &any), Verdict::Sign);
        let only = Signs::Only(vec!["web".into()]);
        assert_eq!(judge(&event, Some(&before), &only), Verdict::Sign);
    }

    #[test]
    fn the_release_signed_last_is_announced_again() {
        let before = last("1.0.0", "a");
        let verdict = judge(&detected("web", "1.0.0", "a"), Some(&before), &Signs::Any);
        assert_eq!(verdict, Verdict::AnnounceAgain(&before.signed));
    }

    #[test]
    fn a_version_not_newer_is_refused_whatever_its_archive() {
        let before = last("1.2.0", "a");
        for (version, blake3) in [("1.2.0", "other"), ("1.1.9", "a"), ("0.1.0", "z")] {
            let (code, message) = refused(judge(
                &detected("web", version, blake3),
                Some(&before),
                &Signs::Any,
            ));
            assert_eq!(code, RejectCode::VersionNotNewer);
            assert!(message.contains("not newer than 1.2.0"), "{message}");
        }
    }

    #[test]
    fn an_app_it_does_not_sign_is_refused_and_an_empty_list_says_so() {
        let event = detected("web", "1.0.0", "a");
        let (code, message) = refused(judge(&event, None, &Signs::Only(vec!["api".into()])));
        assert_eq!(code, RejectCode::UnknownApp);
        assert!(
            message.contains("not in the signer's known_apps"),
            "{message}"
        );
        let (code, message) = refused(judge(&event, None, &Signs::Nothing));
        assert_eq!(code, RejectCode::UnknownApp);
        assert!(message.contains("signs no app"), "{message}");
    }

    mod rollback {
        use fleetcast_events::manifest::TreeRoot;
        use fleetcast_events::{SecretKey, SignedManifest};

        use super::*;

        const TTL: Duration = Duration::from_secs(600);

        fn request(to: &str, from: &str) -> RollbackRequested {
            RollbackRequested {
                app: AppName::from_static("web"),
                to: to.parse().expect("to"),
                from: from.parse().expect("from"),
                ring: None,
                requested_by: "ops".into(),
            }
        }

        /// The release record of web `version`, stored, its manifest signed by `key`.
        fn stored(version: &str, key: &SecretKey, now: OffsetDateTime) -> ReleaseRecord {
            let manifest = Manifest {
                app: AppName::from_static("web"),
                version: version.parse().expect("version"),
                tree: TreeRoot {
                    root: "ab".repeat(32),
                    len: 0,
                    files: 0,
                    bytes: 0,
                },
                created: now,
                expires: now + Duration::from_secs(3600),
                rollback_from: None,
            };
            ReleaseRecord {
                app: manifest.app.clone(),
                version: manifest.version.clone(),
                state: ReleaseState::Stored,
                blake3: Some("b".into()),
                reason: None,
                manifest: Some(SignedManifest::sign(&manifest, &[key]).expect("sign")),
                stored: None,
                updated: now,
            }
        }

        /// The verdict on `request` when `latest` is the latest version signed and `ours`
        /// this signer's key.
        fn judged(
            request: &RollbackRequested,
            latest: Option<&str>,
            target: Option<ReleaseRecord>,
            ours: &SecretKey,
            now: OffsetDateTime,
        ) -> Result<Manifest, Rejection> {
            let latest: Option<semver::Version> = latest.map(|v| v.parse().expect("latest"));
            let ours = TrustedKeys::new(vec![ours.public()]);
            judge_rollback(request, latest.as_ref(), target, &ours, now, TTL)
        }

        /// Checks that `verdict` refuses with `code`, saying `says`.
        fn assert_refused(verdict: Result<Manifest, Rejection>, code: RejectCode, says: &str) {
            let refused = verdict.expect_err(says);
            assert_eq!(refused.code, code, "{}", refused.message);
            assert!(refused.message.contains(says), "{}", refused.message);
        }

        #[test]
        fn the_stored_release_this_signer_signed_is_re_signed_as_a_rollback() {
            let key = SecretKey::generate().expect("key");
            let now = OffsetDateTime::now_utc()
                .replace_nanosecond(0)
                .expect("now");
            let target = Some(stored("1.0.0", &key, now));
            let manifest = judged(&request("1.0.0", "1.1.0"), Some("1.1.0"), target, &key, now)
                .expect("signed");
            assert_eq!(manifest.version, semver::Version::new(1, 0, 0));
            assert_eq!(manifest.rollback_from, Some(semver::Version::new(1, 1, 0)));
            assert_eq!((manifest.created, manifest.expires), (now, now + TTL));
        }

        #[test]
        fn a_rollback_forward_or_from_a_version_not_the_latest_is_refused() {
            let key = SecretKey::generate().expect("key");
            let now = OffsetDateTime::now_utc();
            let target = || Some(stored("1.0.0", &key, now));
            for (to, from) in [("1.1.0", "1.1.0"), ("1.2.0", "1.1.0")] {
                let verdict = judged(&request(to, from), Some(from), target(), &key, now);
                assert_refused(verdict, RejectCode::InvalidEvent, "earlier version");
            }
            let typo = request("1.0.0", "99.0.0");
            let verdict = judged(&typo, Some("1.1.0"), target(), &key, now);
            let code = RejectCode::RollbackFromNotLatest;
            assert_refused(verdict, code, "the latest version signed is 1.1.0");
            let verdict = judged(&request("1.0.0", "1.1.0"), None, target(), &key, now);
            assert_refused(verdict, code, "the latest version signed is none");
        }

        #[test]
        fn a_release_not_stored_or_not_signed_here_is_not_re_signed() {
            let key = SecretKey::generate().expect("key");
            let now = OffsetDateTime::now_utc();
            let rollback = request("1.0.0", "1.1.0");
            let latest = Some("1.1.0");
            let code = RejectCode::InvalidEvent;
            let verdict = judged(&rollback, latest, None, &key, now);
            assert_refused(verdict, code, "web 1.0.0 is not a stored release");
            let mut signed_only = stored("1.0.0", &key, now);
            signed_only.state = ReleaseState::Signed;
            let verdict = judged(&rollback, latest, Some(signed_only), &key, now);
            assert_refused(verdict, code, "web 1.0.0 is not a stored release");
            let other = SecretKey::generate().expect("key");
            let verdict = judged(
                &rollback,
                latest,
                Some(stored("1.0.0", &other, now)),
                &key,
                now,
            );
            assert_refused(verdict, code, "stored manifest of 1.0.0");
        }
    }

    #[test]
    fn a_bad_app_name_is_an_invalid_event() {
        let event = detected("web", "1.0.0", "a");
        let json = fleetcast_events::Encoding::Json
            .encode(&event)
            .expect("json");
        let text = String::from_utf8(json).expect("utf-8");
        for bad in ["", "Web", "../x", "a b"] {
            let forged = text.replace("\"app\":\"web\"", &format!("\"app\":{bad:?}"));
            assert_ne!(forged, text);
            let decoded =
                fleetcast_events::Encoding::Json.decode::<PackageDetected>(forged.as_bytes());
            assert!(
                decoded.is_err_and(|e| e.to_string().contains("app name")),
                "{bad:?}"
            );
        }
    }
}
