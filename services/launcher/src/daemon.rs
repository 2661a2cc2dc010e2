//! The launcher's loop: one thread, `poll()` on its signals, its listening socket and its
//! connections (100 ms at most), then reaping with `waitid`/`waitpid` and the timers.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{self, AddressFamily, Backlog, MsgFlags, SockFlag, SockType, UnixAddr};
use nix::sys::stat::Mode;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;

use crate::files::{self, Release, Trial, TrialStarted};
use crate::policy::{self, AgentExit, Backoff, Launch};
use crate::protocol::{self, Request};
use crate::{ENV_FDS, ENV_RELEASE, ENV_ROOT, ENV_TRIAL, EXIT_RUN_TRIAL};

/// The poll timeout: how late a timer (backoff, trial deadline, old agent) may fire.
const TICK: Duration = Duration::from_millis(100);
/// How long a previous launcher's agent gets to detach (store its fds and exit) on SIGUSR2.
const OLD_AGENT_GRACE: Duration = Duration::from_secs(30);
/// How long a process may take to go after SIGKILL before the launcher stops waiting for it.
const KILLED_GONE_WITHIN: Duration = Duration::from_secs(5);
/// How long a trial agent stopped at its qualify deadline gets to detach before SIGKILL.
const TRIAL_STOP_GRACE: Duration = Duration::from_secs(10);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
const EXIT_RECORD_AGE: Duration = Duration::from_secs(3600);
/// Open connections at most: the agent needs one or two; more is a misbehaving client.
const MAX_CONNS: usize = 64;
/// Room for the stored fds, the clones made while spawning and the placeholders below them.
const NOFILE_WANTED: u64 = 4096;
const INTERRUPTED: &str = "interrupted: the launcher restarted during the trial";

pub const USAGE: &str = "\
usage: fleetcast-launcher --root DIR --agent PATH [-- AGENT_ARGS...]

Runs the fleetcast agent and keeps it running: the release named in DIR/current, or PATH (the
installed agent) when there is none; trials of new agent releases, going back to the previous
one when a trial fails; restarts with backoff. Keeps the apps' file descriptors across agent
restarts (DIR/launcher.sock) and reaps the apps an exiting agent leaves behind.

  --root DIR     state directory (created 0700 if missing)
  --agent PATH   the installed agent binary
  AGENT_ARGS     passed to every agent it starts
  --help         this text
  --version      the launcher's version
";

/// Logs one line to stderr (the journal). A failed write is ignored: the launcher must not
/// die because its log went away.
macro_rules! log {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stderr(), "fleetcast-launcher: {}", format_args!($($arg)*));
    }};
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub root: PathBuf,
    pub agent: PathBuf,
    pub agent_args: Vec<OsString>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cli {
    Run(Config),
    Help,
    Version,
}

/// Why the command line is refused (printed with the usage, exit code 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error("--root needs a directory")]
    RootWithoutDir,
    #[error("--agent needs a path")]
    AgentWithoutPath,
    #[error("unexpected argument {0:?}")]
    Unexpected(OsString),
    #[error("--root DIR is required")]
    NoRoot,
    #[error("--agent PATH is required")]
    NoAgent,
}

pub fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Cli, ArgsError> {
    let mut args = args.into_iter();
    let (mut root, mut agent, mut agent_args) = (None, None, Vec::new());
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--help" | "-h") => return Ok(Cli::Help),
            Some("--version" | "-V") => return Ok(Cli::Version),
            Some("--root") => {
                root = Some(args.next().ok_or(ArgsError::RootWithoutDir)?);
            }
            Some("--agent") => {
                agent = Some(args.next().ok_or(ArgsError::AgentWithoutPath)?);
            }
            Some(s) if s.starts_with("--root=") => root = Some(s["--root=".len()..].into()),
            Some(s) if s.starts_with("--agent=") => agent = Some(s["--agent=".len()..].into()),
            Some("--") => {
                agent_args = args.by_ref().collect();
            }
            _ => return Err(ArgsError::Unexpected(arg)),
        }
    }
    let root = root.filter(|r| !r.is_empty()).ok_or(ArgsError::NoRoot)?;
    let agent = agent.filter(|a| !a.is_empty()).ok_or(ArgsError::NoAgent)?;
    Ok(Cli::Run(Config {
        root: root.into(),
        agent: agent.into(),
        agent_args,
    }))
}

/// Runs until SIGTERM or SIGINT has stopped the agent. Errors: what kept it from starting.
pub fn run(config: Config) -> io::Result<()> {
    let root = prepare_root(&config.root)?;
    // Held for the launcher's life: a second launcher on the same root would take over the
    // socket and run a second agent.
    let _lock = lock_root(&root)?;
    let installed = std::path::absolute(&config.agent).map_err(|e| {
        io::Error::new(e.kind(), format!("--agent {}: {e}", config.agent.display()))
    })?;
    files::check_path(&installed).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;

    // Apps whose agent exits are re-parented to the launcher (not to init): it reaps them
    // and records their exits for the next agent.
    nix::sys::prctl::set_child_subreaper(true).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot become a subreaper: {e}"),
        )
    })?;
    // Signals come through a signalfd in the poll set: no handler, no races with the loop.
    // (The Rust runtime already ignores SIGPIPE.) Agents get an empty mask and SIGPIPE's
    // default action back (fd::prepare_child).
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        mask.add(s);
    }
    mask.thread_block()?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
    let nofile_soft = raise_nofile();

    let exits = root.join(files::EXITS);
    match fs::DirBuilder::new().mode(0o700).create(&exits) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot create {}: {e}", exits.display()),
            ));
        }
    }
    let listener = bind(&root.join(files::SOCKET))?;
    log!(
        "started (root {}, installed agent {})",
        root.display(),
        installed.display()
    );

    let now = Instant::now();
    let mut daemon = Daemon {
        root,
        installed,
        args: config.agent_args,
        listener,
        signals,
        conns: Vec::new(),
        store: BTreeMap::new(),
        agent: None,
        old: None,
        backoff: Backoff::default(),
        next_start: now,
        stopping: false,
        last_prune: now,
        nofile_soft,
    };
    daemon.prune_exits();
    daemon.detach_old_agent();
    daemon.run();
    Ok(())
}

fn prepare_root(root: &Path) -> io::Result<PathBuf> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .and_then(|()| fs::canonicalize(root))
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create --root {}: {e}", root.display()),
            )
        })
}

fn lock_root(root: &Path) -> io::Result<nix::fcntl::Flock<fs::File>> {
    let dir = fs::File::open(root)?;
    nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        if e == Errno::EWOULDBLOCK {
            io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another fleetcast-launcher runs with --root {}",
                    root.display()
                ),
            )
        } else {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot lock {}: {e}", root.display()),
            )
        }
    })
}

/// Raises the open-file soft limit for up to 1024 stored fds; the old soft limit (restored
/// for the agents it starts) when it raised it.
fn raise_nofile() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let wanted = NOFILE_WANTED.min(hard);
    if soft >= wanted {
        return None;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, wanted, hard) {
        Ok(()) => Some(soft),
        Err(e) => {
            log!("cannot raise the open-file limit from {soft} to {wanted}: {e}");
            None
        }
    }
}

/// The listening socket, 0600. Bound and listening under a temporary name first, then
/// renamed over `path` (replacing a stale socket of a launcher that was killed; the root lock
/// says no other launcher uses it): a client that finds the file can connect.
fn bind(path: &Path) -> io::Result<OwnedFd> {
    let annotate = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {}: {e}", path.display()),
        )
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    let tmp_name = format!(".{}.tmp", files::SOCKET);
    let tmp = dir.join(&tmp_name);
    files::remove(dir, &tmp_name)?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| annotate(e.into()))?;
    let addr = UnixAddr::new(&tmp).map_err(|e| annotate(e.into()))?;
    // The umask makes the socket 0600 from the start (chmod after bind would leave a window).
    let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o177));
    let bound = socket::bind(fd.as_raw_fd(), &addr);
    nix::sys::stat::umask(old);
    bound.map_err(|e| annotate(e.into()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(annotate)?;
    socket::listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN))
        .map_err(|e| annotate(e.into()))?;
    fs::rename(&tmp, path).map_err(annotate)?;
    Ok(fd)
}

/// Refuses what is neither a script (`#!`) nor an ELF program for this machine, with the
/// error exec gives for it (ENOEXEC). glibc's execvp, which std uses to start a process with
/// a `pre_exec`, runs a file the kernel refuses with ENOEXEC through /bin/sh instead of
/// failing: an agent built for another architecture (or a truncated one) would "run" as a
/// shell script and exit with whatever the shell makes of it.
fn check_executable(path: &Path) -> io::Result<()> {
    const HEAD: usize = 20;
    fn head(path: &Path) -> io::Result<Vec<u8>> {
        let mut bytes = Vec::with_capacity(HEAD);
        fs::File::open(path)?
            .take(HEAD as u64)
            .read_to_end(&mut bytes)?;
        Ok(bytes)
    }
    let bytes = head(path)?;
    if bytes.starts_with(b"#!") {
        return Ok(());
    }
    if bytes.len() == HEAD && bytes.starts_with(b"\x7fELF") {
        // Class (32/64 bit), byte order and e_machine must be this launcher's own.
        let same = |own: &[u8]| {
            own.len() == HEAD && own[4..6] == bytes[4..6] && own[18..20] == bytes[18..20]
        };
        match head(Path::new("/proc/self/exe")) {
            Ok(own) if !same(&own) => {}
            _ => return Ok(()),
        }
    }
    Err(io::Error::from_raw_os_error(libc::ENOEXEC))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// What the launcher started.
#[derive(Debug)]
enum Kind {
    Installed,
    Current(String),
    Trial {
        trial: Trial,
        fallback: TrialStarted,
        deadline: Instant,
    },
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kind::Installed => f.write_str("installed agent"),
            Kind::Current(v) => write!(f, "release {v}"),
            Kind::Trial { trial, .. } => write!(f, "trial of release {}", trial.version),
        }
    }
}

#[derive(Debug)]
struct Agent {
    pid: Pid,
    path: PathBuf,
    started: Instant,
    kind: Kind,
    /// `trial.qualified` was seen.
    qualified: bool,
    /// Stopped at its qualify deadline (SIGUSR2 sent): SIGKILL at this time if still there.
    deadline_stop: Option<Instant>,
    killed: bool,
}

/// An agent a previous launcher (killed) left running: asked to detach.
#[derive(Debug)]
struct OldAgent {
    pid: u32,
    start_time: u64,
    kill_at: Instant,
    killed: bool,
}

struct Daemon {
    root: PathBuf,
    installed: PathBuf,
    args: Vec<OsString>,
    listener: OwnedFd,
    signals: SignalFd,
    conns: Vec<OwnedFd>,
    /// The fd store (closing an fd = dropping it).
    store: BTreeMap<String, OwnedFd>,
    agent: Option<Agent>,
    old: Option<OldAgent>,
    backoff: Backoff,
    /// No agent runs: start one at this time.
    next_start: Instant,
    stopping: bool,
    last_prune: Instant,
    nofile_soft: Option<u64>,
}

impl Daemon {
    fn run(&mut self) {
        loop {
            self.wait_for_events();
            self.read_signals();
            self.serve();
            self.reap();
            self.check_old_agent();
            self.check_trial_deadline();
            let idle = self.agent.is_none() && self.old.is_none();
            if self.stopping && idle {
                self.kill_leftovers();
                log!("stopped");
                return;
            }
            if !self.stopping && idle && Instant::now() >= self.next_start {
                self.start_next();
            }
            if self.last_prune.elapsed() >= PRUNE_EVERY {
                self.prune_exits();
            }
        }
    }

    /// On stop, once the agent has stopped its apps and exited: what is still re-parented to
    /// the launcher (a process an app left behind outside its process group) is killed, as
    /// systemd would with `KillMode=mixed`. The unit says `KillMode=process` so that systemd
    /// never kills the apps when the launcher itself dies (docs/self-update.md).
    fn kill_leftovers(&mut self) {
        let me = std::process::id();
        for _ in 0..100 {
            let left = files::children_of(me);
            if left.is_empty() {
                return;
            }
            for pid in left {
                log!("killing pid {pid}, left behind by an app");
                if let Ok(raw) = i32::try_from(pid) {
                    let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
            self.reap();
        }
    }

    fn wait_for_events(&self) {
        let mut timeout = TICK;
        if !self.stopping && self.agent.is_none() && self.old.is_none() {
            timeout = timeout.min(self.next_start.saturating_duration_since(Instant::now()));
        }
        let mut fds = Vec::with_capacity(2 + self.conns.len());
        fds.push(PollFd::new(self.signals.as_fd(), PollFlags::POLLIN));
        fds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
        fds.extend(
            self.conns
                .iter()
                .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)),
        );
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        // Which fd is ready does not matter: everything is then handled without blocking.
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                log!("poll: {e}");
                // Not a busy loop should poll keep failing.
                std::thread::sleep(TICK);
            }
        }
    }

    fn read_signals(&mut self) {
        loop {
            match self.signals.read_signal() {
                Ok(Some(info)) => {
                    let signo = info.ssi_signo as i32;
                    if signo == Signal::SIGTERM as i32 || signo == Signal::SIGINT as i32 {
                        self.begin_stop(signo);
                    }
                    // SIGCHLD only wakes the loop; reaping follows.
                }
                Ok(None) => return,
                Err(Errno::EINTR) => {}
                Err(e) => {
                    log!("reading signals: {e}");
                    return;
                }
            }
        }
    }

    fn begin_stop(&mut self, signo: i32) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        let name = Signal::try_from(signo)
            .map_or_else(|_| format!("signal {signo}"), |s| format!("{s:?}"));
        match &self.agent {
            Some(agent) => {
                log!(
                    "{name}: stopping the agent (pid {}) and then myself",
                    agent.pid
                );
                // The agent stops its apps gracefully on SIGTERM.
                if let Err(e) = kill(agent.pid, Signal::SIGTERM) {
                    log!("cannot signal the agent (pid {}): {e}", agent.pid);
                }
            }
            None => log!("{name}: stopping"),
        }
    }

    /// Accepts pending connections and handles every pending request on every connection.
    fn serve(&mut self) {
        loop {
            match crate::fd::accept(self.listener.as_fd()) {
                Ok(Some(conn)) if self.conns.len() < MAX_CONNS => self.conns.push(conn),
                Ok(Some(_)) => log!("refused a connection: {MAX_CONNS} are open already"),
                Ok(None) => break,
                Err(e) => {
                    log!("accept: {e}");
                    break;
                }
            }
        }
        let mut conns = std::mem::take(&mut self.conns);
        conns.retain(|conn| self.serve_conn(conn));
        self.conns = conns;
    }

    /// Handles what is pending on `conn`; `false` once it is closed (or broken).
    fn serve_conn(&mut self, conn: &OwnedFd) -> bool {
        let mut buf = [0u8; protocol::MAX_REQUEST];
        loop {
            let msg = match crate::fd::recv(conn.as_fd(), &mut buf) {
                Ok(Some(msg)) => msg,
                Ok(None) => return true,
                Err(e) => {
                    log!("receiving a request: {e}");
                    return false;
                }
            };
            if msg.len == 0 && msg.fds.is_empty() {
                return false;
            }
            let answer = if msg.truncated {
                Some(format!(
                    "err request longer than {} bytes",
                    protocol::MAX_REQUEST
                ))
            } else {
                self.handle(&buf[..msg.len], msg.fds)
            };
            if let Some(answer) = answer {
                if answer != protocol::OK {
                    log!("refused a request: {answer}");
                }
                // Never blocks: a client that does not read its answers loses its connection.
                if let Err(e) = socket::send(
                    conn.as_raw_fd(),
                    answer.as_bytes(),
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                ) {
                    if e != Errno::EPIPE && e != Errno::ECONNRESET {
                        log!("answering a request: {e}");
                    }
                    return false;
                }
            }
        }
    }

    /// One request; the answer, if any. Fds not kept are closed when `fds` drops.
    fn handle(&mut self, request: &[u8], mut fds: Vec<OwnedFd>) -> Option<String> {
        let request = match protocol::parse_request(request) {
            Ok(r) => r,
            Err(e) => return Some(format!("err {e}")),
        };
        match request {
            Request::Store(name) => {
                if fds.len() != 1 {
                    return Some(format!(
                        "err store {name}: expected exactly one fd, got {}",
                        fds.len()
                    ));
                }
                if !self.store.contains_key(name) && self.store.len() >= protocol::MAX_FDS {
                    return Some(format!(
                        "err store {name}: the store is full ({} fds)",
                        protocol::MAX_FDS
                    ));
                }
                if let Some(fd) = fds.pop() {
                    // Replaces (and so closes) any fd stored under that name.
                    self.store.insert(name.to_owned(), fd);
                }
                None
            }
            Request::Remove(name) => {
                if !fds.is_empty() {
                    return Some(format!("err remove {name}: takes no fd"));
                }
                self.store.remove(name);
                None
            }
            Request::Sync if !fds.is_empty() => Some("err sync takes no fd".to_owned()),
            Request::Sync => Some(protocol::OK.to_owned()),
        }
    }

    /// Reaps every exited child. Each is first looked at without reaping it (WNOWAIT) so its
    /// start time can still be read from /proc: with it, the agent can tell the record of its
    /// app from that of another process that got the same pid later.
    fn reap(&mut self) {
        loop {
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
            let pid = match waitid(Id::All, flags) {
                Ok(status) => match status.pid() {
                    Some(pid) => pid,
                    None => return,
                },
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => return,
                Err(e) => {
                    log!("waitid: {e}");
                    return;
                }
            };
            let start_time = u32::try_from(pid.as_raw())
                .ok()
                .and_then(|p| files::proc_stat(p).ok())
                .map(|(_, start)| start);
            let exit = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => AgentExit::Code(code),
                Ok(WaitStatus::Signaled(_, signal, _)) => AgentExit::Signal(signal as i32),
                Ok(other) => {
                    log!("waitpid {pid}: unexpected {other:?}");
                    return;
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log!("waitpid {pid}: {e}");
                    return;
                }
            };
            if self.agent.as_ref().is_some_and(|a| a.pid == pid) {
                // Requests the agent sent just before it died are still queued: handled first
                // (a `store` sent just before a crash must not be lost).
                self.serve();
                if let Some(agent) = self.agent.take() {
                    self.agent_exited(agent, exit);
                }
            } else {
                self.record_exit(pid, start_time, &exit);
            }
        }
    }

    fn record_exit(&self, pid: Pid, start_time: Option<u64>, exit: &AgentExit) {
        let (code, signal) = match *exit {
            AgentExit::Code(c) => (Some(c), None),
            AgentExit::Signal(s) => (None, Some(s)),
            AgentExit::Spawn(_) => (None, None),
        };
        let text = files::format_exit(&files::Exit {
            start_time,
            code,
            signal,
        });
        if let Err(e) = files::write(&self.root.join(files::EXITS), &pid.to_string(), &text) {
            log!("cannot record the exit of pid {pid}: {e}");
        }
    }

    fn agent_exited(&mut self, agent: Agent, exit: AgentExit) {
        if let Err(e) = files::remove(&self.root, files::AGENT_PID) {
            log!("{e}");
        }
        let ran = agent.started.elapsed();
        log!(
            "agent (pid {}, {}) {exit} after {:.1}s",
            agent.pid,
            agent.kind,
            ran.as_secs_f64()
        );
        if self.stopping {
            // A trial stopped with the launcher is judged by the next launcher
            // ("interrupted"), which finds its trial.started.
            return;
        }
        let now = Instant::now();
        if let Kind::Trial {
            trial, fallback, ..
        } = &agent.kind
        {
            // Promoting removes `trial` (then `trial.started`): while both are there, the
            // trial has not promoted itself, and its exit fails it.
            if files::exists(&self.root, files::TRIAL_STARTED)
                && files::exists(&self.root, files::TRIAL)
            {
                let qualified =
                    agent.qualified || files::exists(&self.root, files::TRIAL_QUALIFIED);
                let deadline = agent.deadline_stop.map(|_| trial.qualify.as_secs());
                let reason = policy::trial_failure_reason(&exit, qualified, deadline);
                self.fail_trial(&trial.version, Some(fallback), &reason);
                self.next_start = now;
                return;
            }
        }
        if exit == AgentExit::Code(i32::from(EXIT_RUN_TRIAL)) {
            self.next_start = now;
            return;
        }
        let delay = self.backoff.crashed(now, ran);
        if !delay.is_zero() {
            log!(
                "restarting the agent in {}s (it keeps exiting)",
                delay.as_secs()
            );
        }
        self.next_start = now + delay;
    }

    /// Goes back to `fallback` (when known: else `current` is left as it is, which a trial
    /// never changes but by promoting), records the failure for the agent and removes the
    /// trial's files.
    fn fail_trial(&mut self, version: &str, fallback: Option<&TrialStarted>, reason: &str) {
        match fallback {
            Some(f) => log!(
                "trial of release {version} failed: {reason}; going back to {}",
                f.version.as_deref().unwrap_or("the installed agent")
            ),
            None => log!("trial of release {version} failed: {reason}"),
        }
        let restored = match fallback {
            Some(TrialStarted {
                version: Some(v),
                path,
                ..
            }) => files::format_current(&Release {
                version: v.clone(),
                path: path.clone(),
            })
            .and_then(|text| files::write(&self.root, files::CURRENT, &text)),
            Some(TrialStarted { version: None, .. }) => files::remove(&self.root, files::CURRENT),
            None => Ok(()),
        };
        if let Err(e) = restored {
            log!("cannot restore the previous release: {e}");
        }
        let failed = files::format_trial_failed(version, reason);
        if let Err(e) = files::write(&self.root, files::TRIAL_FAILED, &failed) {
            log!("{e}");
        }
        self.remove_trial_files();
    }

    fn remove_trial_files(&self) {
        // trial.started last: while it is there a restarted launcher finishes this.
        for name in [files::TRIAL_QUALIFIED, files::TRIAL, files::TRIAL_STARTED] {
            if let Err(e) = files::remove(&self.root, name) {
                log!("{e}");
            }
        }
        if let Err(e) = files::sync_dir(&self.root) {
            log!("{e}");
        }
    }

    /// A `trial.started` with no trial running: the launcher stopped or died during that
    /// trial (or while finishing it). Still requested (`trial` there): it failed. Else it
    /// promoted itself and only its leftovers go.
    fn settle_interrupted_trial(&mut self) {
        if !files::exists(&self.root, files::TRIAL_STARTED) {
            return;
        }
        if !files::exists(&self.root, files::TRIAL) {
            self.remove_trial_files();
            return;
        }
        let fallback =
            match files::load(&self.root, files::TRIAL_STARTED, files::parse_trial_started) {
                Ok(f) => f,
                Err(e) => {
                    log!("{e}; leaving current as it is");
                    None
                }
            };
        let version = self.trial_version_best_effort();
        self.fail_trial(&version, fallback.as_ref(), INTERRUPTED);
    }

    /// The version in `trial`, even when the rest of the file is bad.
    fn trial_version_best_effort(&self) -> String {
        files::read(&self.root, files::TRIAL)
            .ok()
            .flatten()
            .and_then(|t| t.split_whitespace().next().map(str::to_owned))
            .filter(|v| files::check_version(v).is_ok())
            .unwrap_or_else(|| "unknown".to_owned())
    }

    fn start_next(&mut self) {
        self.settle_interrupted_trial();
        let current = match files::load(&self.root, files::CURRENT, files::parse_current) {
            Ok(c) => c,
            Err(e) => {
                log!("{e}; running the installed agent");
                None
            }
        };
        let trial = match files::load(&self.root, files::TRIAL, files::parse_trial) {
            Ok(t) => t,
            Err(e) => {
                let version = self.trial_version_best_effort();
                self.fail_trial(&version, None, &format!("unreadable trial request: {e}"));
                None
            }
        };
        let now = Instant::now();
        match policy::decide(current, trial, &self.installed, unix_now()) {
            Launch::Trial { trial, fallback } => {
                // A stale qualification must not count for this trial; and without
                // trial.started a restarted launcher could not tell where to go back.
                let recorded = files::remove(&self.root, files::TRIAL_QUALIFIED)
                    .and_then(|()| files::format_trial_started(&fallback))
                    .and_then(|text| files::write(&self.root, files::TRIAL_STARTED, &text));
                if let Err(e) = recorded {
                    let reason = format!("cannot record the trial start: {e}");
                    self.fail_trial(&trial.version, Some(&fallback), &reason);
                    self.next_start = now;
                    return;
                }
                log!(
                    "starting a trial of release {} ({}), qualify within {}s",
                    trial.version,
                    trial.path.display(),
                    trial.qualify.as_secs()
                );
                let env = [
                    (ENV_RELEASE, Some(trial.version.clone())),
                    (ENV_TRIAL, Some("1".to_owned())),
                ];
                let path = trial.path.clone();
                let deadline = now + trial.qualify;
                self.spawn(
                    path,
                    &env,
                    Kind::Trial {
                        trial,
                        fallback,
                        deadline,
                    },
                );
            }
            Launch::Current(release) => {
                let env = [
                    (ENV_RELEASE, Some(release.version.clone())),
                    (ENV_TRIAL, None),
                ];
                self.spawn(release.path, &env, Kind::Current(release.version));
            }
            Launch::Installed(path) => {
                let env = [(ENV_RELEASE, None), (ENV_TRIAL, None)];
                self.spawn(path, &env, Kind::Installed);
            }
        }
    }

    fn spawn(&mut self, path: PathBuf, env: &[(&str, Option<String>)], kind: Kind) {
        let started = Instant::now();
        let result = self.spawn_process(&path, env);
        let mut agent = Agent {
            pid: Pid::from_raw(0),
            path,
            started,
            kind,
            qualified: false,
            deadline_stop: None,
            killed: false,
        };
        match result {
            Ok(pid) => {
                agent.pid = pid;
                log!(
                    "started the agent (pid {pid}, {}, {}) with {} stored fds",
                    agent.kind,
                    agent.path.display(),
                    self.store.len()
                );
                self.agent = Some(agent);
            }
            Err(e) => {
                // Not starting is an exit like any other (a trial then fails with it).
                let exit = AgentExit::Spawn(format!("cannot run {}: {e}", agent.path.display()));
                self.agent_exited(agent, exit);
            }
        }
    }

    fn spawn_process(&self, path: &Path, env: &[(&str, Option<String>)]) -> io::Result<Pid> {
        check_executable(path)?;
        let mut cmd = Command::new(path);
        cmd.args(&self.args).env(ENV_ROOT, &self.root).env(
            ENV_FDS,
            protocol::format_fd_list(self.store.keys().map(String::as_str)),
        );
        for (name, value) in env {
            match value {
                Some(v) => cmd.env(name, v),
                None => cmd.env_remove(name),
            };
        }
        // The stored fds go to 3, 4, ... in the child. Every fd number below 3 + n is taken
        // here first (placeholders), so the clones and std's own spawn fds land above them
        // and the child's dup2 calls cannot overwrite any of those (see fd::map_at_exec).
        let n = self.store.len();
        let top = 3 + n as i32;
        let mut placeholders = Vec::new();
        loop {
            // try_clone takes the lowest free number ≥ 3, close-on-exec.
            let fd = self.listener.try_clone()?;
            if fd.as_raw_fd() >= top {
                break;
            }
            placeholders.push(fd);
        }
        let sources = self
            .store
            .values()
            .map(|fd| fd.try_clone())
            .collect::<io::Result<Vec<_>>>()?;
        if sources.iter().any(|fd| fd.as_raw_fd() < top) {
            return Err(io::Error::other("stored fds overlap their target numbers"));
        }
        crate::fd::prepare_child(&mut cmd, sources, self.nofile_soft);
        let child = cmd.spawn()?;
        drop(cmd);
        drop(placeholders);
        let pid = child.id();
        // Dropping a Child neither kills nor waits: the loop reaps it like every other child.
        drop(child);
        let raw = i32::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
        match files::proc_stat(pid) {
            Ok((_, start)) => {
                if let Err(e) =
                    files::write(&self.root, files::AGENT_PID, &format!("{pid} {start}\n"))
                {
                    log!("{e}");
                }
            }
            Err(e) => log!("cannot read the start time of the agent (pid {pid}): {e}"),
        }
        Ok(Pid::from_raw(raw))
    }

    /// At start: an agent left running by a previous launcher (killed) is asked to detach,
    /// i.e. to store its fds here and exit leaving its apps running. The socket is already
    /// served, so it can.
    fn detach_old_agent(&mut self) {
        let recorded = match files::load(&self.root, files::AGENT_PID, files::parse_agent_pid) {
            Ok(r) => r,
            Err(e) => {
                log!("{e}");
                None
            }
        };
        if let Some((pid, start_time)) = recorded
            && pid != std::process::id()
            && files::is_alive(pid, start_time)
            && let Ok(raw) = i32::try_from(pid)
        {
            log!("the agent of a previous launcher still runs (pid {pid}): asking it to detach");
            if let Err(e) = kill(Pid::from_raw(raw), Signal::SIGUSR2) {
                log!("cannot signal pid {pid}: {e}");
            }
            self.old = Some(OldAgent {
                pid,
                start_time,
                kill_at: Instant::now() + OLD_AGENT_GRACE,
                killed: false,
            });
            return;
        }
        if recorded.is_some()
            && let Err(e) = files::remove(&self.root, files::AGENT_PID)
        {
            log!("{e}");
        }
    }

    fn check_old_agent(&mut self) {
        let Some(old) = &mut self.old else {
            return;
        };
        if !files::is_alive(old.pid, old.start_time) {
            log!("the previous agent (pid {}) exited", old.pid);
            self.old = None;
            if let Err(e) = files::remove(&self.root, files::AGENT_PID) {
                log!("{e}");
            }
            return;
        }
        if old.killed && Instant::now() >= old.kill_at + KILLED_GONE_WITHIN {
            // Killed yet still there (stuck in the kernel, e.g. on a dead NFS mount): waiting
            // longer would leave the host without an agent.
            log!(
                "the previous agent (pid {}) is still there {}s after SIGKILL: not waiting longer",
                old.pid,
                KILLED_GONE_WITHIN.as_secs()
            );
            self.old = None;
            return;
        }
        if !old.killed && Instant::now() >= old.kill_at {
            log!(
                "the previous agent (pid {}) did not exit within {}s: killing it",
                old.pid,
                OLD_AGENT_GRACE.as_secs()
            );
            if let Ok(raw) = i32::try_from(old.pid)
                && let Err(e) = kill(Pid::from_raw(raw), Signal::SIGKILL)
            {
                log!("cannot kill pid {}: {e}", old.pid);
            }
            old.killed = true;
        }
    }

    /// A trial must write `trial.qualified` within its qualify time: else it is asked to
    /// detach (SIGUSR2: its apps keep running for the fallback agent), then killed.
    fn check_trial_deadline(&mut self) {
        if self.stopping {
            return;
        }
        let root = &self.root;
        let Some(agent) = &mut self.agent else {
            return;
        };
        let Kind::Trial {
            trial, deadline, ..
        } = &agent.kind
        else {
            return;
        };
        let now = Instant::now();
        if agent.deadline_stop.is_none() && !agent.qualified && now >= *deadline {
            // Qualified, or already promoted: nothing to stop.
            if files::exists(root, files::TRIAL_QUALIFIED) || !files::exists(root, files::TRIAL) {
                agent.qualified = true;
            } else {
                log!(
                    "trial of release {} did not qualify within {}s: asking it to detach",
                    trial.version,
                    trial.qualify.as_secs()
                );
                if let Err(e) = kill(agent.pid, Signal::SIGUSR2) {
                    log!("cannot signal the agent (pid {}): {e}", agent.pid);
                }
                agent.deadline_stop = Some(now + TRIAL_STOP_GRACE);
            }
        }
        if let Some(at) = agent.deadline_stop
            && !agent.killed
            && now >= at
        {
            log!(
                "trial agent (pid {}) did not exit within {}s: killing it",
                agent.pid,
                TRIAL_STOP_GRACE.as_secs()
            );
            if let Err(e) = kill(agent.pid, Signal::SIGKILL) {
                log!("cannot kill the agent (pid {}): {e}", agent.pid);
            }
            agent.killed = true;
        }
    }

    /// Removes exit records older than an hour (apps whose agent never asked).
    fn prune_exits(&mut self) {
        self.last_prune = Instant::now();
        let dir = self.root.join(files::EXITS);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                log!("cannot list {}: {e}", dir.display());
                return;
            }
        };
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= EXIT_RECORD_AGE);
            if old && let Err(e) = fs::remove_file(entry.path()) {
                log!("cannot remove {}: {e}", entry.path().display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn command_line() {
        assert_eq!(
            parse_args(args(&[
                "--root", "/r", "--agent", "/a", "--", "--config", "x"
            ])),
            Ok(Cli::Run(Config {
                root: "/r".into(),
                agent: "/a".into(),
                agent_args: args(&["--config", "x"]),
            }))
        );
        assert_eq!(
            parse_args(args(&["--root=/r", "--agent=/a"])),
            Ok(Cli::Run(Config {
                root: "/r".into(),
                agent: "/a".into(),
                agent_args: vec![],
            }))
        );
        assert_eq!(parse_args(args(&["--help"])), Ok(Cli::Help));
        assert_eq!(parse_args(args(&["--version"])), Ok(Cli::Version));
        assert!(parse_args(args(&["--root", "/r"])).is_err());
        assert!(parse_args(args(&["--agent", "/a"])).is_err());
        assert!(parse_args(args(&["--root"])).is_err());
        assert!(parse_args(args(&["--root", "/r", "--agent", "/a", "extra"])).is_err());
    }
}
