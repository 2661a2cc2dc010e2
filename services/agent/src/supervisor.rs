//! Supervises one application process: starts it in its own process group (so stopping it
//! reaches every process it started: no orphans), forwards its output to the log with the app's
//! name, restarts it after an unexpected exit following [`CrashPolicy`], pauses a crash loop,
//! and stops it gracefully: the drain signal, a grace period, then SIGKILL to the whole group.
//!
//! A supervisor is a task owned through a [`Supervisor`] handle; what happens to the process is
//! published as [`Event`]s (the agent turns them into status events).

use std::collections::BTreeMap;
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
    Stop(oneshot::Sender<StopOutcome>),
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
        child: Child,
        pid: u32,
        started: Instant,
        spec: ProcessSpec,
    },
    Waiting {
        until: Instant,
        spec: ProcessSpec,
    },
}

struct Task {
    app: String,
    crash: CrashPolicy,
    stop: StopPolicy,
    events: broadcast::Sender<Event>,
    history: CrashHistory,
    pid_file: Option<PathBuf>,
}

impl Task {
    fn record_pid(&self, pid: Option<u32>) {
        let Some(path) = &self.pid_file else { return };
        let result = match pid.and_then(|p| start_time(p).map(|t| (p, t))) {
            Some((pid, start)) => {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, format!("{pid} {start}\n"))
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
                    Some(Command_::Stop(reply)) => {
                        let _ = reply.send(StopOutcome::NotRunning);
                        State::Idle
                    }
                    None => return,
                },
                State::Waiting { until, spec } => tokio::select! {
                    _ = tokio::time::sleep_until(until) => self.spawn(spec),
                    command = commands.recv() => match command {
                        Some(Command_::Start(_)) => State::Waiting { until, spec },
                        Some(Command_::Stop(reply)) => {
                            let _ = reply.send(StopOutcome::NotRunning);
                            State::Idle
                        }
                        None => return,
                    },
                },
                State::Running {
                    mut child,
                    pid,
                    started,
                    spec,
                } => tokio::select! {
                    status = child.wait() => {
                        let (code, signal) = match status {
                            Ok(s) => (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)),
                            Err(_) => (None, None),
                        };
                        self.record_pid(None);
                        self.emit(Event::Exited { code, signal });
                        kill_group(pid, Signal::SIGKILL); // whatever it left behind
                        self.after_crash(started, spec)
                    }
                    command = commands.recv() => match command {
                        Some(Command_::Start(_)) => State::Running { child, pid, started, spec },
                        Some(Command_::Stop(reply)) => {
                            let outcome = self.stop_child(&mut child, pid).await;
                            let _ = reply.send(outcome);
                            State::Idle
                        }
                        None => {
                            self.stop_child(&mut child, pid).await;
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
                if let Some(out) = child.stdout.take() {
                    tokio::spawn(forward(self.app.clone(), "stdout", out));
                }
                if let Some(err) = child.stderr.take() {
                    tokio::spawn(forward(self.app.clone(), "stderr", err));
                }
                self.record_pid(Some(pid));
                self.emit(Event::Started { pid });
                State::Running {
                    child,
                    pid,
                    started,
                    spec,
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

    async fn stop_child(&self, child: &mut Child, pid: u32) -> StopOutcome {
        kill_group(pid, self.stop.signal);
        let graceful = tokio::time::timeout(self.stop.grace, child.wait())
            .await
            .is_ok();
        // Also after a drained exit: the group may hold processes the app left behind.
        kill_group(pid, Signal::SIGKILL);
        if !graceful {
            let _ = child.wait().await;
        }
        self.record_pid(None);
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

/// Stops the app a previous agent process left running (it was killed before it could stop
/// it): drain signal to the recorded process group, `grace`, then SIGKILL. Only when the pid
/// still names the same process (same start time). Returns whether something was stopped.
pub async fn reap_orphan(pid_file: &std::path::Path, signal: Signal, grace: Duration) -> bool {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return false;
    };
    let _ = std::fs::remove_file(pid_file);
    let mut parts = text.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(pid)), Some(Ok(start))) = (parts.next(), parts.next()) else {
        return false;
    };
    let Ok(pid) = u32::try_from(pid) else {
        return false;
    };
    if start_time(pid) != Some(start) {
        return false;
    }
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
