//! Supervises one application process: starts it in its own process group (so stopping it
//! reaches every process it started: no orphans), forwards its output to the log with the app's
//! name, restarts it after an unexpected exit following [`CrashPolicy`], pauses a crash loop,
//! and stops it gracefully: the drain signal, a grace period, then SIGKILL to the whole group.
//!
//! A supervisor is a task owned through a [`Supervisor`] handle; what happens to the process is
//! published as [`Event`]s (the agent turns them into status events).
//!
//! Under `fleetcast-launcher` an app outlives the agent process that started it: the launcher
//! keeps its output pipes, and the next agent [adopts](Supervisor::adopt) the running process
//! (found by its pid file: pid, start time, version folder) instead of starting it again. An
//! adopted process is not the agent's child: its exit is seen through a pidfd and its status
//! is what the launcher, its reaper, recorded.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::BufReader;
use tokio::process::{Child, Command};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::crash_policy::{CrashHistory, CrashPolicy, Decision};
use crate::output::{MAX_LINE, log_app_line, read_line_bounded};

/// How to run the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    /// The user it runs as (`apps.user`); `None`: the agent's own.
    pub run_as: Option<crate::isolation::RunAs>,
    /// Checked before every start (`apps[].verify_on_start`): a version folder that no longer
    /// matches its signed tree is not run; the start fails with the reason.
    pub verify: Option<std::sync::Arc<crate::release_tree::InstalledTree>>,
    /// Listening sockets the agent holds for the app (`apps[].listen`), handed to it by the
    /// socket-activation protocol.
    pub sockets: Option<std::sync::Arc<crate::sockets::Sockets>>,
}

/// A program named by a command: relative names are looked up in the version's folder
/// first (`bin/app`, `run.sh`), then on PATH (`sh`); absolute paths are taken as they are.
pub fn program_path(program: &str, dir: &Path) -> PathBuf {
    let local = dir.join(program);
    if local.exists() {
        local
    } else {
        PathBuf::from(program)
    }
}

/// How to stop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopPolicy {
    /// The drain signal (SIGTERM unless the app wants another).
    pub signal: Signal,
    /// How long the app may take to drain before it is killed.
    pub grace: Duration,
}

impl Default for StopPolicy {
    fn default() -> Self {
        StopPolicy {
            signal: Signal::SIGTERM,
            grace: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Started {
        pid: u32,
    },
    /// The process exited without being asked to.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    Restarting {
        after: Duration,
    },
    CrashLoop {
        pause: Duration,
    },
    SpawnFailed {
        reason: String,
    },
    /// Stopped on request: `graceful` when it exited within the grace period.
    Stopped {
        graceful: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// Exited by itself within the grace period.
    Drained,
    /// Still running after the grace period: killed.
    Killed,
    /// Nothing was running.
    NotRunning,
}

enum Command_ {
    Start(ProcessSpec),
    Adopt(Adoption, ProcessSpec),
    Stop(oneshot::Sender<StopOutcome>),
    /// End supervision and leave the process running (for the next agent to adopt).
    Detach(oneshot::Sender<()>),
}

/// A running app process a previous agent started, to supervise as if this one had: its pid
/// (and process group) and the read ends of its output pipes, kept by the launcher.
#[derive(Debug)]
pub struct Adoption {
    pub pid: u32,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Handle to a supervisor task. Dropping it stops the app (gracefully) and ends the task.
pub struct Supervisor {
    commands: mpsc::Sender<Command_>,
    events: broadcast::Sender<Event>,
}

impl Supervisor {
    pub fn new(app: &str, crash: CrashPolicy, stop: StopPolicy) -> Supervisor {
        Supervisor::with_pid_file(app, crash, stop, None)
    }

    /// As `new`, recording the running process in `pid_file` so that an agent restarted after
    /// a crash can find and stop what its predecessor left running ([`reap_orphan`]).
    pub fn with_pid_file(
        app: &str,
        crash: CrashPolicy,
        stop: StopPolicy,
        pid_file: Option<PathBuf>,
    ) -> Supervisor {
        let (commands, rx) = mpsc::channel(8);
        let (events, _) = broadcast::channel(256);
        let task = Task {
            app: app.to_string(),
            crash,
            stop,
            events: events.clone(),
            history: CrashHistory::default(),
            pid_file,
        };
        tokio::spawn(task.run(rx));
        Supervisor { commands, events }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Runs `spec` (and keeps it running). If something runs already, it keeps running: stop
    /// first to switch versions.
    pub async fn start(&self, spec: ProcessSpec) {
        let _ = self.commands.send(Command_::Start(spec)).await;
    }

    /// Supervises `adoption` (running `spec`) as if it had been started here. Only when
    /// nothing runs: otherwise the command is ignored.
    pub async fn adopt(&self, adoption: Adoption, spec: ProcessSpec) {
        let _ = self.commands.send(Command_::Adopt(adoption, spec)).await;
    }

    /// Ends supervision without stopping the app: it keeps running for the next agent to
    /// adopt. Returns once the task has let go of it.
    pub async fn detach(&self) {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command_::Detach(reply)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// Stops the app: drain signal, grace period, then kill. Returns once it is gone.
    pub async fn stop(&self) -> StopOutcome {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command_::Stop(reply)).await.is_err() {
            return StopOutcome::NotRunning;
        }
        answer.await.unwrap_or(StopOutcome::NotRunning)
    }
}

enum State {
    Idle,
    Running {
        process: Process,
        pid: u32,
        started: Instant,
        spec: ProcessSpec,
        /// The read ends of its output pipes, by the names the launcher keeps them under:
        /// given to it again when the agent detaches (a launcher started since has none).
        kept: Vec<(String, OwnedFd)>,
    },
    Waiting {
        until: Instant,
        spec: ProcessSpec,
    },
}

/// A command while no process runs (idle, or waiting to restart one): the state it leads to,
/// or `None` when the task ends (detached, or every handle dropped). A start or an adoption
/// leaves it in `current`: while waiting, a restart is already due (idle, `Task::run` acts on
/// them before asking here).
fn without_process(command: Option<Command_>, current: State) -> Option<State> {
    match command? {
        Command_::Start(_) | Command_::Adopt(..) => Some(current),
        Command_::Stop(reply) => {
            let _ = reply.send(StopOutcome::NotRunning);
            Some(State::Idle)
        }
        Command_::Detach(reply) => {
            let _ = reply.send(());
            None
        }
    }
}

struct Task {
    app: String,
    crash: CrashPolicy,
    stop: StopPolicy,
    events: broadcast::Sender<Event>,
    history: CrashHistory,
    pid_file: Option<PathBuf>,
}

/// The app's process: a child of this agent, or adopted from a previous one.
enum Process {
    Child(Box<Child>),
    Adopted(tokio::io::unix::AsyncFd<OwnedFd>),
}

impl Process {
    /// Waits for the process to exit: `(code, signal)`, both `None` when it is not known.
    async fn wait(&mut self, pid: u32) -> (Option<i32>, Option<i32>) {
        match self {
            Process::Child(child) => match child.wait().await {
                Ok(s) => (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)),
                Err(_) => (None, None),
            },
            Process::Adopted(pidfd) => {
                // Readable once the process has exited.
                let _ = pidfd.readable().await;
                // Its reaper is the launcher, which records the status on its next round.
                for _ in 0..20 {
                    if let Some(status) = crate::launched::exit_status(pid) {
                        return status;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (None, None)
            }
        }
    }
}

/// A pidfd for `pid` (Linux 5.3): it becomes readable when the process exits, whoever its
/// parent is, and unlike a pid it cannot come to name another process.
fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::other(format!("{pid} is not a pid")))?;
    Ok(rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// Waits for readiness of a pidfd. `AsyncFd::new` is deprecated because it is unsound for a
/// descriptor the `AsyncFd` does not own (it could be closed while registered); this one owns
/// its `OwnedFd`, which is closed only when the `AsyncFd` is dropped.
#[allow(deprecated)]
fn watch_pidfd(fd: OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    tokio::io::unix::AsyncFd::new(fd)
}

impl Task {
    fn record_pid(&self, pid: Option<u32>, cwd: &Path) {
        let Some(path) = &self.pid_file else { return };
        let result = match pid.and_then(|p| start_time(p).map(|t| (p, t))) {
            Some((pid, start)) => {
                // The version folder last: a path may hold spaces.
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, format!("{pid} {start} {}\n", cwd.display()))
                    .and_then(|_| std::fs::rename(&tmp, path))
            }
            None => std::fs::remove_file(path).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            }),
        };
        if let Err(e) = result {
            tracing::warn!(app = %self.app, error = %e, "pid file not updated");
        }
    }

    fn emit(&self, event: Event) {
        tracing::info!(app = %self.app, ?event, "supervisor");
        let _ = self.events.send(event);
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command_>) {
        let mut state = State::Idle;
        loop {
            state = match state {
                State::Idle => match commands.recv().await {
                    Some(Command_::Start(spec)) => self.spawn(spec),
                    Some(Command_::Adopt(adoption, spec)) => self.adopt(adoption, spec),
                    command => match without_process(command, State::Idle) {
                        Some(next) => next,
                        None => return,
                    },
                },
                State::Waiting { until, spec } => tokio::select! {
                    _ = tokio::time::sleep_until(until) => self.spawn(spec),
                    command = commands.recv() => match without_process(command, State::Waiting { until, spec }) {
                        Some(next) => next,
                        None => return,
                    },
                },
                State::Running {
                    mut process,
                    pid,
                    started,
                    spec,
                    kept,
                } => tokio::select! {
                    (code, signal) = process.wait(pid) => {
                        self.gone(&spec);
                        self.emit(Event::Exited { code, signal });
                        kill_group(pid, Signal::SIGKILL); // whatever it left behind
                        self.after_crash(started, spec)
                    }
                    command = commands.recv() => match command {
                        Some(Command_::Start(_) | Command_::Adopt(..)) => State::Running { process, pid, started, spec, kept },
                        Some(Command_::Stop(reply)) => {
                            let outcome = self.stop_process(&mut process, pid, &spec).await;
                            let _ = reply.send(outcome);
                            State::Idle
                        }
                        Some(Command_::Detach(reply)) => {
                            for (name, fd) in &kept {
                                crate::launched::store(name, fd.as_fd());
                            }
                            tracing::info!(app = %self.app, pid, "left running for the next agent");
                            let _ = reply.send(());
                            return;
                        }
                        None => {
                            self.stop_process(&mut process, pid, &spec).await;
                            return;
                        }
                    },
                },
            }
        }
    }

    fn after_crash(&mut self, started: Instant, spec: ProcessSpec) -> State {
        let now = Instant::now();
        let delay = match self.history.crashed(&self.crash, started, now) {
            Decision::Restart(after) => {
                self.emit(Event::Restarting { after });
                after
            }
            Decision::Pause(pause) => {
                self.emit(Event::CrashLoop { pause });
                pause
            }
        };
        State::Waiting {
            until: now + delay,
            spec,
        }
    }

    fn spawn(&mut self, spec: ProcessSpec) -> State {
        let started = Instant::now();
        if let Some(Err(reason)) = spec.verify.as_ref().map(|v| v.check()) {
            tracing::error!(app = %self.app, %reason, "not started: the version changed on disk since it was installed");
            self.emit(Event::SpawnFailed {
                reason: format!("verify_on_start: {reason}"),
            });
            return self.after_crash(started, spec);
        }
        let command = match &spec.sockets {
            Some(sockets) => sockets.command(&spec.program, &spec.args),
            None => {
                let mut command = Command::new(&spec.program);
                command.args(&spec.args);
                Ok(command)
            }
        };
        let mut command = match command {
            Ok(command) => command,
            Err(e) => {
                self.emit(Event::SpawnFailed {
                    reason: format!("handing over the listening sockets: {e}"),
                });
                return self.after_crash(started, spec);
            }
        };
        crate::launched::not_inherited(&mut command);
        command
            .envs(&spec.env)
            .current_dir(&spec.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a stop reaches everything the app started.
            .process_group(0);
        if let Some(run_as) = spec.run_as {
            run_as.apply(&mut command);
        }
        match command.spawn() {
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                // The read ends of its output pipes are also kept by the launcher (if any): an
                // agent that exits leaves the pipes open, and the next one reads them on.
                let mut kept = Vec::new();
                if let Some(out) = child.stdout.take() {
                    kept.extend(self.keep(crate::launched::stdout_name(&self.app), out.as_fd()));
                    tokio::spawn(forward(self.app.clone(), "stdout", out));
                }
                if let Some(err) = child.stderr.take() {
                    kept.extend(self.keep(crate::launched::stderr_name(&self.app), err.as_fd()));
                    tokio::spawn(forward(self.app.clone(), "stderr", err));
                }
                self.record_pid(Some(pid), &spec.cwd);
                self.emit(Event::Started { pid });
                State::Running {
                    process: Process::Child(Box::new(child)),
                    pid,
                    started,
                    spec,
                    kept,
                }
            }
            Err(e) => {
                self.emit(Event::SpawnFailed {
                    reason: format!("{}: {e}", spec.program.display()),
                });
                self.after_crash(started, spec)
            }
        }
    }

    /// Supervises a process a previous agent started (see [`Adoption`]). One that is gone
    /// already is an exit like any other: restarted after the crash policy's delay.
    fn adopt(&mut self, adoption: Adoption, spec: ProcessSpec) -> State {
        let started = Instant::now();
        let Adoption {
            pid,
            stdout,
            stderr,
        } = adoption;
        let mut kept = Vec::new();
        let names = [
            crate::launched::stdout_name(&self.app),
            crate::launched::stderr_name(&self.app),
        ];
        for ((stream, fd), name) in [("stdout", stdout), ("stderr", stderr)]
            .into_iter()
            .zip(names)
        {
            kept.extend(self.keep(name, fd.as_fd()));
            match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
                Ok(pipe) => {
                    tokio::spawn(forward(self.app.clone(), stream, pipe));
                }
                Err(e) => {
                    tracing::warn!(app = %self.app, pid, stream, error = %e, "the adopted app's output cannot be read")
                }
            }
        }
        let pidfd = pidfd_open(pid).and_then(watch_pidfd);
        match pidfd {
            Ok(pidfd) => {
                tracing::info!(app = %self.app, pid, "adopted the running app from the previous agent");
                State::Running {
                    process: Process::Adopted(pidfd),
                    pid,
                    started,
                    spec,
                    kept,
                }
            }
            Err(e) => {
                tracing::warn!(app = %self.app, pid, error = %e, "the app to adopt is gone");
                self.gone(&spec);
                self.emit(Event::Exited {
                    code: None,
                    signal: None,
                });
                self.after_crash(started, spec)
            }
        }
    }

    /// Keeps `fd` in the launcher (if any) under `name`, and a duplicate here to keep it there
    /// again on detach. `None` without a launcher.
    fn keep(&self, name: String, fd: std::os::fd::BorrowedFd<'_>) -> Option<(String, OwnedFd)> {
        crate::launched::launcher()?;
        crate::launched::store(&name, fd);
        match fd.try_clone_to_owned() {
            Ok(dup) => Some((name, dup)),
            Err(e) => {
                tracing::warn!(app = %self.app, %name, error = %e, "cannot keep a duplicate for the launcher");
                None
            }
        }
    }

    /// The process is gone: nothing of it is to be adopted any more.
    fn gone(&self, spec: &ProcessSpec) {
        self.record_pid(None, &spec.cwd);
        crate::launched::remove(&crate::launched::stdout_name(&self.app));
        crate::launched::remove(&crate::launched::stderr_name(&self.app));
    }

    async fn stop_process(
        &self,
        process: &mut Process,
        pid: u32,
        spec: &ProcessSpec,
    ) -> StopOutcome {
        kill_group(pid, self.stop.signal);
        let graceful = tokio::time::timeout(self.stop.grace, process.wait(pid))
            .await
            .is_ok();
        // Also after a drained exit: the group may hold processes the app left behind.
        kill_group(pid, Signal::SIGKILL);
        if !graceful {
            let _ = process.wait(pid).await;
        }
        self.gone(spec);
        self.emit(Event::Stopped { graceful });
        if graceful {
            StopOutcome::Drained
        } else {
            StopOutcome::Killed
        }
    }
}

fn kill_group(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        // ESRCH (group already gone) is the normal case after an exit.
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

/// Forwards the app's output line by line, each cut to [`MAX_LINE`] bytes: an app writing one
/// endless line costs the agent no more than that.
async fn forward(app: String, stream: &'static str, pipe: impl tokio::io::AsyncRead + Unpin) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    while let Ok(Some(cut)) = read_line_bounded(&mut reader, MAX_LINE, &mut line).await {
        log_app_line(&app, stream, &String::from_utf8_lossy(&line), cut);
    }
}

/// A process's start time (clock ticks since boot), which tells a live process from a later one
/// that happens to reuse its pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// How long `pid` has run: the system's uptime less the process's start time.
pub fn age(pid: u32) -> Option<Duration> {
    let start = start_time(pid)?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let started = Duration::from_secs_f64(start as f64 / ticks as f64);
    Duration::try_from_secs_f64(uptime)
        .ok()?
        .checked_sub(started)
}

/// The app process a previous agent recorded in `pid_file`, if it still runs: its pid and the
/// version folder it was started in. Only when the pid still names the same process (same
/// start time) and it has not exited.
pub fn recorded(pid_file: &Path) -> Option<Recorded> {
    let text = std::fs::read_to_string(pid_file).ok()?;
    let mut parts = text.trim_end_matches('\n').splitn(3, ' ');
    let pid: u32 = parts.next()?.parse().ok()?;
    let start: u64 = parts.next()?.parse().ok()?;
    // Written before the folder was recorded: unknown, never adopted.
    let cwd = PathBuf::from(parts.next().unwrap_or_default());
    (start_time(pid) == Some(start) && !is_zombie(pid)).then_some(Recorded { pid, start, cwd })
}

/// A live app process a pid file names ([`recorded`]).
#[derive(Debug)]
pub struct Recorded {
    pub pid: u32,
    /// Its start time (clock ticks since boot), which tells it from a later process that
    /// reuses its pid.
    pub start: u64,
    /// The version folder it was started in.
    pub cwd: PathBuf,
}

/// Stops the app a previous agent process left running (it was killed before it could stop
/// it): drain signal to the recorded process group, `grace`, then SIGKILL. Only when the pid
/// still names the same process (same start time). Returns whether something was stopped.
pub async fn reap_orphan(pid_file: &std::path::Path, signal: Signal, grace: Duration) -> bool {
    let found = recorded(pid_file);
    let _ = std::fs::remove_file(pid_file);
    let Some(Recorded { pid, start, .. }) = found else {
        return false;
    };
    tracing::warn!(pid, "stopping the app a previous agent left running");
    kill_group(pid, signal);
    let deadline = Instant::now() + grace;
    while start_time(pid) == Some(start) && !is_zombie(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill_group(pid, Signal::SIGKILL);
    true
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}
