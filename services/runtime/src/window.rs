//! UTC time-of-day windows (`"22:00-04:00"` wraps midnight): an agent's local update windows
//! and the tracker's maintenance windows, in which the disruptive step (the switch) may happen.
//! Downloading and verifying happen at any time, so the switch is quick when a window opens.
//! No windows means always.

use std::fmt;
use std::str::FromStr;

use time::{Duration, OffsetDateTime, Time};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    start: Time,
    end: Time,
}

/// A window that does not parse, or covers no time at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("{0:?} is not a UTC range like \"22:00-04:00\"")]
    Malformed(String),
    #[error("{0:?} is empty")]
    Empty(String),
}

impl FromStr for Window {
    type Err = WindowError;

    fn from_str(s: &str) -> Result<Self, WindowError> {
        let err = || WindowError::Malformed(s.to_string());
        let (a, b) = s.split_once('-').ok_or_else(err)?;
        let parse = |t: &str| -> Result<Time, WindowError> {
            let (h, m) = t.trim().split_once(':').ok_or_else(err)?;
            let (h, m): (u8, u8) = (h.parse().map_err(|_| err())?, m.parse().map_err(|_| err())?);
            Time::from_hms(h, m, 0).map_err(|_| err())
        };
        let (start, end) = (parse(a)?, parse(b)?);
        if start == end {
            return Err(WindowError::Empty(s.to_string()));
        }
        Ok(Window { start, end })
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start.hour(),
            self.start.minute(),
            self.end.hour(),
            self.end.minute()
        )
    }
}

impl Window {
    fn contains(&self, t: Time) -> bool {
        if self.start < self.end {
            self.start <= t && t < self.end
        } else {
            t >= self.start || t < self.end
        }
    }
}

/// Whether an update may switch now.
pub fn allows(windows: &[Window], now: OffsetDateTime) -> bool {
    let t = now.to_offset(time::UtcOffset::UTC).time();
    windows.is_empty() || windows.iter().any(|w| w.contains(t))
}

/// When the next window opens (`now` if one is open), to the minute.
pub fn next_open(windows: &[Window], now: OffsetDateTime) -> OffsetDateTime {
    let now = now.to_offset(time::UtcOffset::UTC);
    if allows(windows, now) {
        return now;
    }
    windows
        .iter()
        .map(|w| {
            let today = now.replace_time(w.start);
            if today > now {
                today
            } else {
                today + Duration::days(1)
            }
        })
        .min()
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{datetime, time};

    fn w(s: &str) -> Window {
        s.parse().expect("window")
    }

    #[test]
    fn parsing() {
        assert_eq!(w("22:00-04:30").to_string(), "22:00-04:30");
        for bad in [
            "",
            "22:00",
            "25:00-01:00",
            "10:00-10:00",
            "a-b",
            "10:60-11:00",
        ] {
            assert!(bad.parse::<Window>().is_err(), "{bad}");
        }
    }

    #[test]
    fn windows_allow_and_tell_when_they_open() {
        let nightly = [w("22:00-04:00")];
        assert!(allows(&nightly, datetime!(2026-11-22 23:30 UTC)));
        assert!(allows(&nightly, datetime!(2026-11-23 03:59 UTC)));
        assert!(!allows(&nightly, datetime!(2026-11-23 04:00 UTC)));
        assert!(!allows(&nightly, datetime!(2026-11-23 12:00 UTC)));
        let two = [w("09:00-10:00"), w("13:00-14:00")];
        // (windows, now on 2026-11-23, when they next open): now itself while one is open.
        let cases = [
            (&nightly[..], time!(12:00), datetime!(2026-11-23 22:00 UTC)),
            (&nightly[..], time!(23:00), datetime!(2026-11-23 23:00 UTC)),
            (&two[..], time!(10:30), datetime!(2026-11-23 13:00 UTC)),
            (&two[..], time!(15:00), datetime!(2026-11-24 09:00 UTC)),
        ];
        for (windows, at, opens) in cases {
            let now = datetime!(2026-11-23 00:00 UTC).replace_time(at);
            assert_eq!(next_open(windows, now), opens, "{windows:?} at {now}");
        }
        assert!(allows(&[], datetime!(2026-11-23 15:00 UTC)));
        // Offsets other than UTC are converted, not misread.
        assert!(allows(&nightly, datetime!(2026-11-23 00:30 +02:00)));
    }
}
