//! When to restart a crashed app, as a pure function of its crash history and `now`, so it is
//! tested without a clock: exponential backoff between restarts, reset once the app has stayed
//! up a while, and a pause when it crashes too often in a window (a crash loop).

use std::collections::VecDeque;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CrashPolicy {
    /// Delay before the first restart; doubles with each consecutive crash.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// A run at least this long resets the backoff.
    #[serde(with = "humantime_serde")]
    pub stable_after: Duration,
    /// `loop_crashes` crashes within `loop_window` is a crash loop…
    pub loop_crashes: usize,
    #[serde(with = "humantime_serde")]
    pub loop_window: Duration,
    /// …after which the supervisor waits this long before trying again.
    #[serde(with = "humantime_serde")]
    pub loop_pause: Duration,
}

impl Default for CrashPolicy {
    fn default() -> Self {
        CrashPolicy {
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(15),
            stable_after: Duration::from_secs(10),
            loop_crashes: 5,
            loop_window: Duration::from_secs(30),
            loop_pause: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Restart after this delay.
    Restart(Duration),
    /// Crash loop: wait this long, then restart with a clean history.
    Pause(Duration),
}

/// The crashes one app has had, as the policy needs them.
#[derive(Debug, Default, Clone)]
pub struct CrashHistory {
    recent: VecDeque<Instant>,
    consecutive: u32,
}

impl CrashHistory {
    /// Records a crash of a run that started at `started` and ended at `now`, and decides.
    pub fn crashed(&mut self, policy: &CrashPolicy, started: Instant, now: Instant) -> Decision {
        if now.saturating_duration_since(started) >= policy.stable_after {
            self.consecutive = 0;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        self.recent.push_back(now);
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > policy.loop_window)
        {
            self.recent.pop_front();
        }
        if policy.loop_crashes > 0 && self.recent.len() >= policy.loop_crashes {
            self.recent.clear();
            self.consecutive = 0;
            return Decision::Pause(policy.loop_pause);
        }
        let factor = 2u32.saturating_pow(self.consecutive.saturating_sub(1).min(16));
        Decision::Restart(
            policy
                .backoff_initial
                .saturating_mul(factor)
                .min(policy.backoff_max),
        )
    }

    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_resets_after_a_stable_run() {
        let policy = CrashPolicy {
            loop_crashes: 0,
            ..Default::default()
        };
        let mut h = CrashHistory::default();
        let t0 = Instant::now();
        let mut now = t0;
        let mut delays = Vec::new();
        for _ in 0..7 {
            let started = now;
            now += ms(100);
            match h.crashed(&policy, started, now) {
                Decision::Restart(d) => delays.push(d),
                Decision::Pause(_) => panic!("no loop detection configured"),
            }
        }
        assert_eq!(
            delays,
            [
                ms(500),
                ms(1000),
                ms(2000),
                ms(4000),
                ms(8000),
                ms(15000),
                ms(15000)
            ]
        );
        let started = now;
        now += Duration::from_secs(11);
        assert_eq!(h.crashed(&policy, started, now), Decision::Restart(ms(500)));
    }

    #[test]
    fn five_crashes_in_thirty_seconds_pause_the_app() {
        let policy = CrashPolicy::default();
        let mut h = CrashHistory::default();
        let mut now = Instant::now();
        for i in 0..4 {
            let started = now;
            now += Duration::from_secs(2);
            assert!(
                matches!(h.crashed(&policy, started, now), Decision::Restart(_)),
                "crash {i}"
            );
        }
        let started = now;
        now += Duration::from_secs(2);
        assert_eq!(
            h.crashed(&policy, started, now),
            Decision::Pause(Duration::from_secs(60))
        );
        // After the pause the history starts over.
        let started = now + Duration::from_secs(60);
        assert_eq!(
            h.crashed(&policy, started, started + ms(10)),
            Decision::Restart(ms(500))
        );
    }

    #[test]
    fn crashes_spread_beyond_the_window_are_not_a_loop() {
        let policy = CrashPolicy {
            stable_after: Duration::from_secs(3600),
            ..Default::default()
        };
        let mut h = CrashHistory::default();
        let mut now = Instant::now();
        for _ in 0..20 {
            let started = now;
            now += Duration::from_secs(10);
            assert!(matches!(
                h.crashed(&policy, started, now),
                Decision::Restart(_)
            ));
        }
    }
}
