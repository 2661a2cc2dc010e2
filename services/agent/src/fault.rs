//! Crash points for the crash-matrix tests. With the `fault-points` feature, [`hit`] aborts the
//! agent (no cleanup, no drop handlers: as a kill -9 would) when `FLEETCAST_FAULT_POINT` names
//! the point; without the feature it compiles to nothing. (Not `FLEETCAST_AGENT_…`: the agent
//! reads those as its settings, and refuses to start on one it does not know.)

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

/// The agent's own upgrade (docs/self-update.md): the old agent has told the launcher to run
/// the new one on trial and not exited yet; the new one has become the launcher's current and
/// not recorded it in its journal yet.
pub const SELF_UPDATE_POINTS: &[&str] = &["trial-written", "promoted"];

/// The variable naming the point to abort at.
pub const ENV: &str = "FLEETCAST_FAULT_POINT";

/// Whether this build has the points: the end-to-end tests build the agent binary they run with
/// the same feature as the agent library they link, or the crash matrix would never abort.
pub const ENABLED: bool = cfg!(feature = "fault-points");

/// The items given, only when this build has the fault points: a test in another crate cannot
/// test this crate's features with `cfg`, and one without the points would never see its abort.
#[cfg(feature = "fault-points")]
#[macro_export]
macro_rules! with_fault_points {
    ($($item:item)*) => { $($item)* };
}

/// Without the points: nothing.
#[cfg(not(feature = "fault-points"))]
#[macro_export]
macro_rules! with_fault_points {
    ($($item:item)*) => {};
}

#[cfg(feature = "fault-points")]
pub fn hit(point: &str) {
    if std::env::var(ENV).is_ok_and(|p| p == point) {
        eprintln!("fault point {point}: aborting");
        std::process::abort();
    }
}

#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub fn hit(_point: &str) {}
