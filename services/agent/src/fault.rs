//! Crash points for the crash-matrix tests. With the `fault-points` feature, [`hit`] aborts the
//! agent (no cleanup, no drop handlers: as a kill -9 would) when `FLEETCAST_AGENT_FAULT` names
//! the point; without the feature it compiles to nothing.

/// Every point, in the order an update passes them.
pub const POINTS: &[&str] = &[
    "downloading",
    "staging-journaled",
    "staged",
    "pre-switch-done",
    "switching-journaled",
    "old-stopped",
    "switched",
    "new-started",
    "health-journaled",
    "gate-passed",
    "committed",
    "rollback-journaled",
    "rollback-stopped",
    "rollback-switched",
    "rollback-started",
];

#[cfg(feature = "fault-points")]
pub fn hit(point: &str) {
    if std::env::var("FLEETCAST_AGENT_FAULT").is_ok_and(|p| p == point) {
        eprintln!("fault point {point}: aborting");
        std::process::abort();
    }
}

#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub fn hit(_point: &str) {}
