//! The launcher's decisions, free of I/O: what to run next, when to restart a crashed agent,
//! and why a trial failed.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::files::{Release, Trial, TrialStarted};

/// This many crashes within [`CRASH_WINDOW`] restart the agent at once ...
pub const CRASHES_AT_ONCE: usize = 5;
pub const CRASH_WINDOW: Duration = Duration::from_secs(30);
/// ... beyond that the wait starts here and doubles up to [`MAX_DELAY`] ...
pub const FIRST_DELAY: Duration = Duration::from_secs(1);
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// ... until an agent has run this long.
pub const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// What the launcher starts next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// A trial; `trial.started` (naming the fallback) is written before it starts.
    Trial {
        trial: Trial,
        fallback: TrialStarted,
    },
    /// The `current` release.
    Current(Release),
    /// The installed agent (`--agent PATH`): there is no `current`.
    Installed(PathBuf),
}

/// What to run, from the files (read by the caller): a requested trial that has not started
/// yet, else `current`, else the installed agent. (A `trial.started` left from a trial that
/// was interrupted is settled before this is asked.)
pub fn decide(
    current: Option<Release>,
    trial: Option<Trial>,
    installed: &Path,
    now_unix: u64,
) -> Launch {
    match trial {
        Some(trial) => {
            let fallback = match current {
                Some(r) => TrialStarted {
                    at_unix: now_unix,
                    version: Some(r.version),
                    path: r.path,
                },
                None => TrialStarted {
                    at_unix: now_unix,
                    version: None,
                    path: installed.to_owned(),
                },
            };
            Launch::Trial { trial, fallback }
        }
        None => match current {
            Some(r) => Launch::Current(r),
            None => Launch::Installed(installed.to_owned()),
        },
    }
}

/// How an agent ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentExit {
    Code(i32),
    Signal(i32),
    /// It could not be started: `cannot run <path>: <error>`.
    Spawn(String),
}

impl std::fmt::Display for AgentExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentExit::Code(c) => write!(f, "exited with code {c}"),
            AgentExit::Signal(s) => match nix::sys::signal::Signal::try_from(*s) {
                Ok(sig) => write!(f, "killed by signal {s} ({})", AsRef::<str>::as_ref(&sig)),
                Err(_) => write!(f, "killed by signal {s}"),
            },
            AgentExit::Spawn(e) => f.write_str(e),
        }
    }
}

/// Why a trial that ended without promoting itself failed. `deadline`: the launcher stopped it
/// because it did not qualify within that many seconds.
pub fn trial_failure_reason(exit: &AgentExit, qualified: bool, deadline: Option<u64>) -> String {
    if let Some(secs) = deadline {
        return format!("did not qualify within {secs}s");
    }
    match exit {
        AgentExit::Spawn(e) => e.clone(),
        _ if qualified => format!("{exit} within the soak (after qualifying)"),
        _ => format!("{exit} before qualifying"),
    }
}

/// The restart backoff for crashed agents: at once for up to [`CRASHES_AT_ONCE`] crashes
/// within [`CRASH_WINDOW`]; then [`FIRST_DELAY`], doubling up to [`MAX_DELAY`], until an agent
/// has run [`HEALTHY_RUN`]. Once it waits it keeps doubling even when the waits spread the
/// crashes beyond the window (else a 32 s wait would make the next crashes "at once" again).
#[derive(Debug, Clone)]
pub struct Backoff {
    recent: VecDeque<Instant>,
    waiting: bool,
    next_delay: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            recent: VecDeque::new(),
            waiting: false,
            next_delay: FIRST_DELAY,
        }
    }
}

impl Backoff {
    /// An agent that ran `ran_for` crashed at `now`: how long to wait before the next start.
    pub fn crashed(&mut self, now: Instant, ran_for: Duration) -> Duration {
        if ran_for >= HEALTHY_RUN {
            *self = Backoff::default();
        }
        if !self.waiting {
            while self
                .recent
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) > CRASH_WINDOW)
            {
                self.recent.pop_front();
            }
            self.recent.push_back(now);
            if self.recent.len() <= CRASHES_AT_ONCE {
                return Duration::ZERO;
            }
            self.waiting = true;
            self.recent.clear();
        }
        let delay = self.next_delay;
        self.next_delay = (delay * 2).min(MAX_DELAY);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(v: &str) -> Release {
        Release {
            version: v.into(),
            path: format!("/r/{v}/agent").into(),
        }
    }

    fn trial(v: &str) -> Trial {
        Trial {
            version: v.into(),
            path: format!("/r/{v}/agent").into(),
            qualify: Duration::from_secs(60),
            soak: Duration::from_secs(300),
        }
    }

    #[test]
    fn decide_prefers_a_trial_then_current_then_installed() {
        let installed = Path::new("/usr/bin/fleetcast-agent");
        assert_eq!(
            decide(None, None, installed, 9),
            Launch::Installed(installed.into())
        );
        assert_eq!(
            decide(Some(release("1")), None, installed, 9),
            Launch::Current(release("1"))
        );
        assert_eq!(
            decide(Some(release("1")), Some(trial("2")), installed, 9),
            Launch::Trial {
                trial: trial("2"),
                fallback: TrialStarted {
                    at_unix: 9,
                    version: Some("1".into()),
                    path: "/r/1/agent".into()
                }
            }
        );
        assert_eq!(
            decide(None, Some(trial("2")), installed, 9),
            Launch::Trial {
                trial: trial("2"),
                fallback: TrialStarted {
                    at_unix: 9,
                    version: None,
                    path: installed.into()
                }
            }
        );
    }

    #[test]
    fn failure_reasons() {
        assert_eq!(
            trial_failure_reason(&AgentExit::Code(1), false, None),
            "exited with code 1 before qualifying"
        );
        assert_eq!(
            trial_failure_reason(&AgentExit::Signal(9), false, None),
            "killed by signal 9 (SIGKILL) before qualifying"
        );
        assert_eq!(
            trial_failure_reason(&AgentExit::Code(3), true, None),
            "exited with code 3 within the soak (after qualifying)"
        );
        assert_eq!(
            trial_failure_reason(&AgentExit::Signal(9), false, Some(30)),
            "did not qualify within 30s"
        );
        assert_eq!(
            trial_failure_reason(
                &AgentExit::Spawn("cannot run /a: Exec format error (os error 8)".into()),
                false,
                None
            ),
            "cannot run /a: Exec format error (os error 8)"
        );
    }

    /// How long a crashing agent ran.
    const SHORT: Duration = Duration::from_secs(1);

    /// `count` short runs, crashing `apart` from `first` on: each restarted at once.
    fn crashes_restarted_at_once(b: &mut Backoff, first: Instant, apart: Duration, count: u32) {
        for i in 0..count {
            assert_eq!(
                b.crashed(first + apart * i, SHORT),
                Duration::ZERO,
                "crash {i}"
            );
        }
    }

    #[test]
    fn backoff_five_at_once_then_doubling_to_a_minute() {
        let mut b = Backoff::default();
        let t0 = Instant::now();
        crashes_restarted_at_once(&mut b, t0, SHORT, 5);
        let mut now = t0 + Duration::from_secs(5);
        let mut delays = Vec::new();
        for _ in 0..9 {
            let d = b.crashed(now, SHORT);
            delays.push(d.as_secs());
            now += d + SHORT;
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn backoff_window_forgets_old_crashes() {
        let mut b = Backoff::default();
        // Crashes 31 s apart never pile up to more than 5 within 30 s.
        crashes_restarted_at_once(&mut b, Instant::now(), Duration::from_secs(31), 20);
    }

    #[test]
    fn backoff_resets_after_a_healthy_run() {
        let mut b = Backoff::default();
        let t0 = Instant::now();
        crashes_restarted_at_once(&mut b, t0, Duration::ZERO, 5);
        assert_eq!(b.crashed(t0, SHORT), Duration::from_secs(1));
        assert_eq!(b.crashed(t0, SHORT), Duration::from_secs(2));
        // An agent that ran a minute: back to restarting at once, five times again.
        let later = t0 + Duration::from_secs(100);
        assert_eq!(b.crashed(later, HEALTHY_RUN), Duration::ZERO);
        crashes_restarted_at_once(&mut b, later, Duration::ZERO, 4);
        assert_eq!(b.crashed(later, SHORT), Duration::from_secs(1));
    }
}
