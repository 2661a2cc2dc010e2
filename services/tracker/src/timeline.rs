//! A rollout's timeline: how many of its hosts were done, switching, failed and waiting, over
//! time, for the rollout page's plot (`/rollout?app=`, data at `/api/rollouts/{app}/timeline`).
//! A sample is taken when the counts change, and the timeline is saved with its rollout, so a
//! restarted tracker keeps it. It stays bounded: past [`MAX_SAMPLES`], the sample whose
//! neighbours are closest in time goes, so the samples stay spread over the whole rollout
//! (a burst, a ring's hosts reporting within a second, is thinned first, which no plot of
//! minutes shows anyway), and the first and the latest are always kept.

pub use fleetcast_events::tracker::Sample;
use fleetcast_events::v1::{HistoryEntry, HistoryKind};
use time::OffsetDateTime;

/// At most this many samples per rollout (about 40 KB as JSON, saved with the rollout).
pub const MAX_SAMPLES: usize = 500;

fn same_counts(a: &Sample, b: &Sample) -> bool {
    (a.done, a.switching, a.failed, a.waiting) == (b.done, b.switching, b.failed, b.waiting)
}

/// Adds `sample` to `timeline` if its counts differ from the last one's (or it is the first),
/// thinning the timeline back under [`MAX_SAMPLES`]. Whether the timeline changed.
pub fn record(timeline: &mut Vec<Sample>, sample: Sample) -> bool {
    if timeline
        .last()
        .is_some_and(|last| same_counts(last, &sample))
    {
        return false;
    }
    timeline.push(sample);
    if timeline.len() > MAX_SAMPLES {
        thin(timeline);
    }
    true
}

/// Drops the one sample (never the first or the last) whose neighbours are closest in time:
/// what it showed is the shortest stretch of the plot.
fn thin(timeline: &mut Vec<Sample>) {
    let narrowest = timeline
        .windows(3)
        .enumerate()
        .min_by_key(|(_, w)| w[2].at - w[0].at)
        .map(|(i, _)| i + 1);
    if let Some(i) = narrowest {
        timeline.remove(i);
    }
}

/// The history entries the plot marks: the rollout's start and end, each ring's start and
/// end, a halt.
pub const MARK_KINDS: [HistoryKind; 6] = [
    HistoryKind::RolloutStarted,
    HistoryKind::RingStarted,
    HistoryKind::RingCompleted,
    HistoryKind::RolloutHalted,
    HistoryKind::RolloutCompleted,
    HistoryKind::RolloutAborted,
];

/// The marks among a version's history `entries`: those of the rollout made at `created`
/// (not of an earlier rollout of the same version, e.g. before a rollback to it).
pub fn marks(entries: Vec<HistoryEntry>, created: OffsetDateTime) -> Vec<HistoryEntry> {
    entries
        .into_iter()
        .filter(|e| MARK_KINDS.contains(&e.kind) && e.at >= created)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_events::RingName;
    use fleetcast_events::tracker::RingProgress;

    fn at(s: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(s)
    }

    fn sample(s: i64, done: usize) -> Sample {
        Sample {
            at: at(s),
            done,
            switching: 0,
            failed: 0,
            waiting: 0,
        }
    }

    #[test]
    fn counts_sum_over_rings_and_the_rest_of_the_targets_wait() {
        let rings = [
            RingProgress {
                ring: RingName::from_static("canary"),
                targets: 2,
                done: 1,
                failed: 1,
                switching: 0,
                stale: 3,
            },
            RingProgress {
                ring: RingName::from_static("broad"),
                targets: 5,
                done: 1,
                failed: 0,
                switching: 2,
                stale: 0,
            },
        ];
        let s = Sample::of(&rings, at(7));
        assert_eq!(
            (s.done, s.switching, s.failed, s.waiting, s.at),
            (2, 2, 1, 2, at(7))
        );
    }

    #[test]
    fn a_sample_is_kept_only_when_the_counts_change() {
        let mut timeline = Vec::new();
        assert!(record(&mut timeline, sample(0, 0)));
        assert!(!record(&mut timeline, sample(1, 0)));
        assert!(record(&mut timeline, sample(2, 1)));
        assert!(!record(&mut timeline, sample(3, 1)));
        // Back to earlier counts is a change too.
        assert!(record(&mut timeline, sample(4, 0)));
        let times: Vec<_> = timeline.iter().map(|s| s.at).collect();
        assert_eq!(times, [at(0), at(2), at(4)]);
    }

    #[test]
    fn a_long_timeline_stays_bounded_and_spread_over_the_whole_rollout() {
        let mut timeline = Vec::new();
        let n = 10 * MAX_SAMPLES as i64;
        for i in 0..n {
            // Every sample differs from the one before.
            assert!(record(&mut timeline, sample(i, i as usize)));
            assert!(timeline.len() <= MAX_SAMPLES, "{} samples", timeline.len());
        }
        assert_eq!(timeline.len(), MAX_SAMPLES);
        assert_eq!(timeline.first().map(|s| s.at), Some(at(0)), "the start");
        assert_eq!(timeline.last().map(|s| s.at), Some(at(n - 1)), "the latest");
        assert!(
            timeline.windows(2).all(|w| w[0].at < w[1].at),
            "in order, no duplicates"
        );
        // No stretch of the rollout lost: the widest gap is a few times the average.
        let average = n / MAX_SAMPLES as i64;
        let widest = widest_gap(&timeline);
        assert!(
            widest <= 4 * average,
            "a gap of {widest} s, average {average} s"
        );
    }

    #[test]
    fn a_burst_is_thinned_before_the_slow_stretches_around_it() {
        let mut timeline = Vec::new();
        // One sample a minute, then a burst of changes within a few seconds, then slow again.
        let mut t = 0;
        for i in 0..MAX_SAMPLES / 2 {
            t += 60;
            assert!(record(&mut timeline, sample(t, i % 2)));
        }
        let burst_start = t;
        for i in 0..MAX_SAMPLES {
            assert!(record(
                &mut timeline,
                sample(t + 1 + i as i64 / 100, i % 2 + 2)
            ));
        }
        t += 10;
        for i in 0..MAX_SAMPLES / 4 {
            t += 60;
            assert!(record(&mut timeline, sample(t, i % 2 + 4)));
        }
        // Every slow sample survived; the burst paid.
        let slow = timeline
            .iter()
            .filter(|s| s.at <= at(burst_start) || s.at > at(burst_start + 10))
            .count();
        assert_eq!(slow, MAX_SAMPLES / 2 + MAX_SAMPLES / 4);
        // No gap wider than the slow stretches' (60 s; 70 s from the burst's end).
        assert!(widest_gap(&timeline) <= 70, "{}", widest_gap(&timeline));
    }

    #[test]
    fn marks_are_the_ring_and_halt_entries_of_this_rollout_only() {
        let entry = |kind, s| HistoryEntry::new(kind, at(s));
        let entries = vec![
            entry(HistoryKind::RolloutStarted, 1),
            entry(HistoryKind::RolloutCompleted, 5),
            entry(HistoryKind::RolloutStarted, 10),
            entry(HistoryKind::RingStarted, 10),
            entry(HistoryKind::HostRolledBack, 12),
            entry(HistoryKind::OperatorAction, 12),
            entry(HistoryKind::RolloutHalted, 13),
        ];
        let kept: Vec<_> = marks(entries, at(10))
            .iter()
            .map(|e| format!("{} {}", e.kind, (e.at - at(0)).whole_seconds()))
            .collect();
        assert_eq!(
            kept,
            ["rollout.started 10", "ring.started 10", "rollout.halted 13"]
        );
    }

    fn widest_gap(timeline: &[Sample]) -> i64 {
        timeline
            .windows(2)
            .map(|w| (w[1].at - w[0].at).whole_seconds())
            .max()
            .unwrap_or(0)
    }
}
