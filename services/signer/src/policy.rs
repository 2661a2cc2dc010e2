//! The signer's policy, decided without IO (and tested without NATS): whether a detected
//! package is signed, announced again, or refused, and why. `lib.rs` reads what the policy
//! needs (the last release signed for the app), asks, and carries the verdict out.

use fleetcast_events::v1::{PackageDetected, RejectCode, Rejection, ReleaseSigned};
use serde::{Deserialize, Serialize};

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
