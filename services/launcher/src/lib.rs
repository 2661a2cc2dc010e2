//! fleetcast-launcher: the small process the service manager starts instead of the agent.
//!
//! It runs the agent release named in its root directory, restarts it with backoff, runs a
//! *trial* of a new agent release and goes back to the previous one when the trial fails, is
//! the child subreaper of the host's apps (they survive an agent exit), and keeps the apps'
//! file descriptors (output pipes, listening sockets) in a small store so that they survive
//! the agent process being replaced or killed.
//!
//! This lib holds both sides: the protocol and state files ([`files`], [`protocol`]), the
//! client the agent uses ([`Launcher`]), and the launcher's own loop ([`daemon`], with its pure
//! decisions in [`policy`]), so that the binary stays a thin `main`.

pub mod client;
pub mod daemon;
mod fd;
pub mod files;
pub mod policy;
pub mod protocol;

pub use client::{ExitRecord, Launcher, TrialFailure};
pub use files::Trial;

/// The exit code with which the agent asks the launcher to run the trial it wrote
/// ([`Launcher::begin_trial`]) or, without a trial, simply to start what the files say now.
pub const EXIT_RUN_TRIAL: u8 = 75;
/// The launcher's root directory (absolute).
pub const ENV_ROOT: &str = "FLEETCAST_LAUNCHER_ROOT";
/// The release (version) of the agent being run; absent for the installed agent (`--agent`).
/// (Not `FLEETCAST_AGENT_…`: the agent reads those as its settings.)
pub const ENV_RELEASE: &str = "FLEETCAST_LAUNCHER_RELEASE";
/// `1` when the agent runs as a trial.
pub const ENV_TRIAL: &str = "FLEETCAST_LAUNCHER_TRIAL";
/// The stored fds the agent inherited: `3=NAME1,4=NAME2,...` (empty when none).
pub const ENV_FDS: &str = "FLEETCAST_LAUNCHER_FDS";
/// Every variable above: the agent removes them from what its apps inherit.
pub const ENV_ALL: [&str; 4] = [ENV_ROOT, ENV_RELEASE, ENV_TRIAL, ENV_FDS];

/// How long a client call may take in all (connecting, sending, waiting for the answer): the
/// agent must never hang on its launcher.
pub const CLIENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
