//! How long to wait between attempts at something that failed for a reason that passes (NATS
//! not reachable yet, JetStream not ready, a store that is down): doubling from a first delay up
//! to a ceiling, for as long as it takes. One schedule for every such loop, from `backon`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// The delays before each next attempt: `first`, doubling, at most `max`, never ending.
/// Start a new one after a success.
pub fn delays(first: Duration, max: Duration) -> impl Iterator<Item = Duration> + Send {
    let mut schedule = ExponentialBuilder::new()
        .with_min_delay(first)
        .with_max_delay(max)
        .without_max_times()
        .build();
    // The schedule never ends; should it ever, waiting the ceiling is the right answer.
    std::iter::from_fn(move || Some(schedule.next().unwrap_or(max)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling_and_stays_there() {
        let ms = Duration::from_millis;
        // In whole milliseconds: backon computes in f32 (400.000006 ms).
        let got: Vec<u128> = delays(ms(200), ms(5_000))
            .take(8)
            .map(|d| d.as_millis())
            .collect();
        assert_eq!(got, [200, 400, 800, 1_600, 3_200, 5_000, 5_000, 5_000]);
    }
}
