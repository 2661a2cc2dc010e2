//! The agent's journal for one app: what it was doing, written atomically (temporary file,
//! fsync, rename, fsync of the folder) *before* each disruptive step, so that after a kill -9 or
//! a power loss the agent knows what to finish or revert. It lives beside, not inside, the
//! install folders, and also keeps what must survive a reinstall: the highest version accepted
//! (no downgrade by replay) and the versions that failed their health gate (never retried
//! automatically).

use std::collections::BTreeSet;
use std::io;
use std::path::Path;

use semver::Version;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// Nothing in progress.
    #[default]
    Idle,
    /// Assembling `target` into its partial folder; the running app is untouched.
    Staging { target: Version },
    /// Stopping `from`, switching `current` to `target`, starting it.
    Switching {
        from: Option<Version>,
        target: Version,
    },
    /// `target` runs, on probation until its health gate passes.
    HealthChecking {
        from: Option<Version>,
        target: Version,
    },
    /// `target` failed; going back to `from`.
    RollingBack {
        from: Option<Version>,
        target: Version,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    pub step: Step,
    /// The version known good (what runs when nothing is in progress).
    pub committed: Option<Version>,
    /// The version committed before it, kept for rollback.
    pub previous: Option<Version>,
    /// Highest version ever accepted from a signed announcement.
    pub highest_accepted: Option<Version>,
    /// Versions that failed their health gate, with the reason.
    pub refused: BTreeSet<(Version, String)>,
}

/// What a restarted agent does before anything else, decided from the journal alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The version `current` must point to (switch if it does not) and that must run.
    pub run: Option<Version>,
    /// A version to add to the refused set (an interrupted rollback).
    pub refuse: Option<(Version, String)>,
}

impl Journal {
    /// Reads the journal; a missing file is a fresh host. A corrupt one is an error: guessing
    /// could start the wrong version.
    pub fn load(path: &Path) -> io::Result<Journal> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Journal::default()),
            Err(e) => Err(e),
        }
    }

    /// Writes the journal so that a crash at any instant leaves the old or the new one.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        fleetcast_runtime::fs::write_atomic(path, &bytes)
    }

    pub fn is_refused(&self, version: &Version) -> bool {
        self.refused.iter().any(|(v, _)| v == version)
    }

    /// After a restart: anything not committed is reverted (the update is then retried from a
    /// clean state, unless it was being rolled back, which is finished).
    pub fn recovery(&self) -> Recovery {
        match &self.step {
            Step::Idle | Step::Staging { .. } => Recovery {
                run: self.committed.clone(),
                refuse: None,
            },
            Step::Switching { from, .. } | Step::HealthChecking { from, .. } => Recovery {
                run: from.clone(),
                refuse: None,
            },
            Step::RollingBack {
                from,
                target,
                reason,
            } => Recovery {
                run: from.clone(),
                refuse: Some((target.clone(), reason.clone())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).expect("version")
    }

    fn journal(step: Step) -> Journal {
        Journal {
            step,
            committed: Some(v("1.0.0")),
            previous: None,
            ..Default::default()
        }
    }

    #[test]
    fn recovery_reverts_everything_not_committed_and_finishes_rollbacks() {
        let idle = journal(Step::Idle).recovery();
        assert_eq!(
            idle,
            Recovery {
                run: Some(v("1.0.0")),
                refuse: None
            }
        );
        let staging = journal(Step::Staging { target: v("2.0.0") }).recovery();
        assert_eq!(staging.run, Some(v("1.0.0")));
        for step in [
            Step::Switching {
                from: Some(v("1.0.0")),
                target: v("2.0.0"),
            },
            Step::HealthChecking {
                from: Some(v("1.0.0")),
                target: v("2.0.0"),
            },
        ] {
            assert_eq!(
                journal(step).recovery(),
                Recovery {
                    run: Some(v("1.0.0")),
                    refuse: None
                }
            );
        }
        let first_install = journal(Step::Switching {
            from: None,
            target: v("2.0.0"),
        })
        .recovery();
        assert_eq!(first_install.run, None);
        let rollback = journal(Step::RollingBack {
            from: Some(v("1.0.0")),
            target: v("2.0.0"),
            reason: "exit 3".into(),
        });
        assert_eq!(
            rollback.recovery(),
            Recovery {
                run: Some(v("1.0.0")),
                refuse: Some((v("2.0.0"), "exit 3".into()))
            }
        );
    }

    #[test]
    fn save_is_atomic_and_load_refuses_garbage() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("journal.json");
        assert_eq!(Journal::load(&path).expect("fresh"), Journal::default());
        let mut j = journal(Step::HealthChecking {
            from: Some(v("1.0.0")),
            target: v("2.0.0"),
        });
        j.refused.insert((v("1.5.0"), "health probe: 503".into()));
        j.save(&path).expect("save");
        assert_eq!(Journal::load(&path).expect("load"), j);
        assert!(j.is_refused(&v("1.5.0")) && !j.is_refused(&v("2.0.0")));
        assert!(!dir.path().join("journal.tmp").exists());
        std::fs::write(&path, br#"{"step":"#).expect("write");
        assert!(Journal::load(&path).is_err());
    }
}
