//! The agent under `fleetcast-launcher` (see docs/self-update.md): the launcher started this
//! process, is the subreaper of the apps, keeps the file descriptors the apps need across agent
//! processes (their output pipes, their listening sockets) and runs the trial of a new agent.
//!
//! Only one launcher can have started a process, and what it handed over (the environment, the
//! inherited descriptors) can be taken only once, so this is process-wide state: [`init`] once
//! at start, [`launcher`] everywhere else. Without a launcher (the agent started directly, or
//! in-process in tests) every function here is a no-op and the agent works as it always did:
//! an agent that exits stops its apps, a restarted one starts them again.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

pub use fleetcast_launcher::{EXIT_RUN_TRIAL, Launcher, Trial, TrialFailure};

static LAUNCHER: OnceLock<Option<Launcher>> = OnceLock::new();

/// How this agent process ends (see [`Exit`]).
static EXIT: AtomicU8 = AtomicU8::new(Exit::Stop as u8);

/// How the agent ends when it is shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Stop every app gracefully, then exit (SIGTERM: the host or the service is stopping).
    Stop = 0,
    /// Leave the apps running for the next agent to adopt, then exit (SIGUSR2 from the
    /// launcher).
    Detach = 1,
    /// Detach, and exit so that the launcher starts the trial of a new agent.
    RunTrial = 2,
    /// Detach, and exit so that the launcher starts this agent again at once (the tracker's
    /// remedy for an agent that hangs).
    Restart = 3,
}

/// Takes what the launcher handed this process, if a launcher started it. Once, before any
/// other function here (later calls return the first answer).
pub fn init() -> Option<&'static Launcher> {
    LAUNCHER
        .get_or_init(|| match Launcher::from_env() {
            Ok(launcher) => launcher,
            Err(e) => {
                // Started by a launcher whose hand-over cannot be read: run as without one
                // (apps are restarted rather than adopted), and say so.
                tracing::error!(error = %e, "the launcher's hand-over is unreadable; running without it");
                None
            }
        })
        .as_ref()
}

/// The launcher that started this process, if any.
pub fn launcher() -> Option<&'static Launcher> {
    LAUNCHER.get().and_then(Option::as_ref)
}

pub fn set_exit(exit: Exit) {
    EXIT.store(exit as u8, Ordering::SeqCst);
}

pub fn exit() -> Exit {
    match EXIT.load(Ordering::SeqCst) {
        1 => Exit::Detach,
        2 => Exit::RunTrial,
        3 => Exit::Restart,
        _ => Exit::Stop,
    }
}

/// Whether the apps are to be left running when the agent ends.
pub fn detaching() -> bool {
    exit() != Exit::Stop
}

/// Keeps a duplicate of `fd` in the launcher under `name`. Best effort: without it, the app is
/// restarted instead of adopted by the next agent (which says why).
pub fn store(name: &str, fd: BorrowedFd<'_>) {
    if let Some(launcher) = launcher()
        && let Err(e) = launcher.store(name, fd)
    {
        tracing::warn!(%name, error = %e, "not kept by the launcher; the next agent will restart the app instead of adopting it");
    }
}

/// Drops what the launcher keeps under `name` (the app it belonged to is gone).
pub fn remove(name: &str) {
    if let Some(launcher) = launcher()
        && let Err(e) = launcher.remove(name)
    {
        tracing::debug!(%name, error = %e, "not removed from the launcher");
    }
}

/// A descriptor the launcher handed this process at start under `name`.
pub fn take(name: &str) -> Option<OwnedFd> {
    launcher().and_then(|l| l.take(name))
}

/// How a process the launcher reaped ended: `(code, signal)`; `None` when it has not said.
pub fn exit_status(pid: u32) -> Option<(Option<i32>, Option<i32>)> {
    launcher()
        .and_then(|l| l.exit_status(pid))
        .map(|r| (r.code, r.signal))
}

/// The names an app's descriptors are kept under in the launcher.
pub fn stdout_name(app: &str) -> String {
    format!("{app}/stdout")
}
pub fn stderr_name(app: &str) -> String {
    format!("{app}/stderr")
}
pub fn socket_name(app: &str, index: usize) -> String {
    format!("{app}/listen/{index}")
}

static SHUTDOWN: OnceLock<tokio_util::sync::CancellationToken> = OnceLock::new();

/// Whether the agent's own desired state has been read since it started (part of a trial's
/// qualification).
static DESIRED_READ: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The token that shuts the agent down, for [`request_exit`].
pub fn on_exit_request(shutdown: tokio_util::sync::CancellationToken) {
    let _ = SHUTDOWN.set(shutdown);
}

/// Ends the agent as `exit` says.
pub fn request_exit(exit: Exit) {
    set_exit(exit);
    if let Some(shutdown) = SHUTDOWN.get() {
        shutdown.cancel();
    }
}

/// Wakes [`desired_read_now`] (a permit is kept when nobody waits yet).
static DESIRED_READ_NOTIFY: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// The agent's own desired state was read (see [`DESIRED_READ`]).
pub fn desired_read() {
    DESIRED_READ.store(true, Ordering::SeqCst);
    DESIRED_READ_NOTIFY.notify_one();
}

pub fn desired_was_read() -> bool {
    DESIRED_READ.load(Ordering::SeqCst)
}

/// Returns once the agent's own desired state has been read: at once if it was.
pub async fn desired_read_now() {
    if !desired_was_read() {
        DESIRED_READ_NOTIFY.notified().await;
    }
}

/// The version this agent reports: the release of it the launcher runs, or the version it was
/// built as (an agent installed by hand).
pub fn agent_version() -> String {
    launcher()
        .and_then(Launcher::release)
        .map_or_else(|| env!("CARGO_PKG_VERSION").to_string(), String::from)
}

/// What the launcher told this agent is not for the apps, hooks and health commands it starts.
pub fn not_inherited(command: &mut tokio::process::Command) {
    for name in fleetcast_launcher::ENV_ALL {
        command.env_remove(name);
    }
}
