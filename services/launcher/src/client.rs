//! The agent's side: what the launcher told it at start (environment, inherited fds), the fd
//! store requests, and the trial files.
//!
//! Every call is blocking and bounded by [`CLIENT_TIMEOUT`](crate::CLIENT_TIMEOUT), so the
//! agent never hangs on its launcher (run them off the async runtime's worker threads, e.g.
//! with `spawn_blocking`, where that matters).

use std::collections::BTreeMap;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, sockopt,
};
use nix::sys::time::TimeVal;

use crate::files::{self, Trial};
use crate::protocol::{self, Request};
use crate::{CLIENT_TIMEOUT, ENV_FDS, ENV_RELEASE, ENV_ROOT, ENV_TRIAL};

/// Requests sent before one `sync`: keeps the fds in flight (which the kernel counts against
/// the sender's open-file limit) and the socket's send buffer small.
const BATCH: usize = 64;

/// A trial that failed: what the launcher wrote to `trial.failed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrialFailure {
    pub version: String,
    pub reason: String,
}

/// How a process the launcher reaped (an app re-parented to it) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitRecord {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// The agent's handle on the launcher that started it.
#[derive(Debug)]
pub struct Launcher {
    root: PathBuf,
    release: Option<String>,
    trial: bool,
    handed: Mutex<BTreeMap<String, OwnedFd>>,
    /// Connected on first use, and again after an error (e.g. a launcher restarted since).
    conn: Mutex<Option<OwnedFd>>,
}

/// The inherited fds are taken once per process: a second owner of the same numbers would
/// close them under the first.
static FDS_TAKEN: AtomicBool = AtomicBool::new(false);

impl Launcher {
    /// From the environment the launcher sets; `Ok(None)` when not started by
    /// fleetcast-launcher. Takes the inherited fds (sets FD_CLOEXEC on each so the agent's
    /// children do not inherit them). Call once, early (a later call hands no fds).
    pub fn from_env() -> io::Result<Option<Launcher>> {
        let Some(root) = std::env::var_os(ENV_ROOT) else {
            return Ok(None);
        };
        let root = PathBuf::from(root);
        if !root.is_absolute() {
            return Err(invalid(format!(
                "{ENV_ROOT}={} is not an absolute path",
                root.display()
            )));
        }
        let release = match std::env::var(ENV_RELEASE) {
            Ok(v) if v.is_empty() => None,
            Ok(v) => Some(v),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(invalid(format!("{ENV_RELEASE} is not UTF-8")));
            }
        };
        let trial = std::env::var_os(ENV_TRIAL).is_some_and(|v| v == "1");
        let list = match std::env::var(ENV_FDS) {
            Ok(v) => v,
            Err(std::env::VarError::NotPresent) => String::new(),
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(invalid(format!("{ENV_FDS} is not UTF-8")));
            }
        };
        let entries =
            protocol::parse_fd_list(&list).map_err(|e| invalid(format!("{ENV_FDS}: {e}")))?;
        let mut handed = BTreeMap::new();
        if !FDS_TAKEN.swap(true, Ordering::SeqCst) {
            for (raw, name) in entries {
                let fd = crate::fd::inherited(raw).map_err(|e| {
                    io::Error::new(e.kind(), format!("{ENV_FDS}: {name} at fd {raw}: {e}"))
                })?;
                handed.insert(name, fd);
            }
        }
        Ok(Some(Launcher {
            root,
            release,
            trial,
            handed: Mutex::new(handed),
            conn: Mutex::new(None),
        }))
    }

    /// A client for the launcher with root `root`, without inherited fds (tests, tools).
    pub fn at(root: &Path) -> Launcher {
        Launcher {
            root: root.to_owned(),
            release: None,
            trial: false,
            handed: Mutex::new(BTreeMap::new()),
            conn: Mutex::new(None),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The release this agent runs as; `None` for the installed agent.
    pub fn release(&self) -> Option<&str> {
        self.release.as_deref()
    }

    pub fn is_trial(&self) -> bool {
        self.trial
    }

    /// The names of the fds handed at start and not taken yet.
    pub fn handed_names(&self) -> Vec<String> {
        lock(&self.handed).keys().cloned().collect()
    }

    /// An fd the launcher handed this agent at start (once per name).
    pub fn take(&self, name: &str) -> Option<OwnedFd> {
        lock(&self.handed).remove(name)
    }

    /// Stores a duplicate in the launcher (it survives this process); waits for `ok` (sends
    /// `sync`).
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.store_all(&[(name.to_owned(), fd)])
    }

    /// Stores several, in batches each confirmed by `ok`; the first refusal is the error (the
    /// others are still sent).
    pub fn store_all(&self, fds: &[(String, BorrowedFd<'_>)]) -> io::Result<()> {
        for (name, _) in fds {
            protocol::check_name(name).map_err(|e| invalid(format!("cannot store: {e}")))?;
        }
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        for batch in fds.chunks(BATCH) {
            let requests: Vec<(String, Option<BorrowedFd<'_>>)> = batch
                .iter()
                .map(|(name, fd)| (protocol::format_request(Request::Store(name)), Some(*fd)))
                .collect();
            self.exchange(&requests, deadline)?;
        }
        Ok(())
    }

    /// Removes (closes) the launcher's fd of that name; an unknown name is fine.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        protocol::check_name(name).map_err(|e| invalid(format!("cannot remove: {e}")))?;
        let request = protocol::format_request(Request::Remove(name));
        self.exchange(&[(request, None)], Instant::now() + CLIENT_TIMEOUT)
    }

    /// The exit of a process the launcher reaped (reads and removes `exits/<pid>`); `None` when
    /// the launcher has not reaped it (yet) or its record is unreadable.
    pub fn exit_status(&self, pid: u32) -> Option<ExitRecord> {
        let name = format!("{}/{pid}", files::EXITS);
        let exit = files::load(&self.root, &name, files::parse_exit).ok()??;
        let _ = files::remove(&self.root, &name);
        Some(ExitRecord {
            code: exit.code,
            signal: exit.signal,
        })
    }

    /// Asks for a trial of another agent release: writes `trial`. The agent then exits with
    /// [`EXIT_RUN_TRIAL`](crate::EXIT_RUN_TRIAL) and the launcher starts the trial.
    pub fn begin_trial(&self, trial: &Trial) -> io::Result<()> {
        files::write(&self.root, files::TRIAL, &files::format_trial(trial)?)
    }

    /// The trial agent has connected and published its first heartbeat.
    pub fn qualified(&self) -> io::Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        files::write(&self.root, files::TRIAL_QUALIFIED, &format!("{now}\n"))
    }

    /// The trial agent after its soak: `current` = the trial's version and path, trial files
    /// removed (`trial` first: once it is gone the launcher no longer counts an exit of this
    /// agent as a failed trial).
    pub fn promote(&self) -> io::Result<()> {
        let trial =
            files::load(&self.root, files::TRIAL, files::parse_trial)?.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no trial to promote in {}", self.root.display()),
                )
            })?;
        let current = files::format_current(&files::Release {
            version: trial.version,
            path: trial.path,
        })?;
        files::write(&self.root, files::CURRENT, &current)?;
        for name in [files::TRIAL, files::TRIAL_QUALIFIED, files::TRIAL_STARTED] {
            files::remove(&self.root, name)?;
        }
        files::sync_dir(&self.root)
    }

    /// A failed trial the launcher recorded, removed once read (also when unreadable: the
    /// error says so, and the next agent is not told the same again).
    pub fn take_trial_failure(&self) -> io::Result<Option<TrialFailure>> {
        let Some(text) = files::read(&self.root, files::TRIAL_FAILED)? else {
            return Ok(None);
        };
        let parsed = files::parse_trial_failed(&text);
        files::remove(&self.root, files::TRIAL_FAILED)?;
        files::sync_dir(&self.root)?;
        let (version, reason) = parsed.map_err(|e| {
            io::Error::new(e.kind(), format!("{e} (the unreadable file was removed)"))
        })?;
        Ok(Some(TrialFailure { version, reason }))
    }

    /// Sends the requests then `sync`, and reads the answers up to `ok`. A connection kept from
    /// an earlier call may be dead (the launcher restarted): then once more on a new one (every
    /// request may be repeated: `store` replaces, `remove` of a removed name is fine).
    fn exchange(
        &self,
        requests: &[(String, Option<BorrowedFd<'_>>)],
        deadline: Instant,
    ) -> io::Result<()> {
        let mut conn = lock(&self.conn);
        let reused = conn.is_some();
        let result = self.exchange_on(&mut conn, requests, deadline);
        let result = match result {
            Err(_) if reused => {
                *conn = None;
                self.exchange_on(&mut conn, requests, deadline)
            }
            other => other,
        };
        match result {
            Ok(refusals) => match refusals.into_iter().next() {
                Some(reason) => Err(io::Error::other(format!(
                    "the launcher refused a request: {reason}"
                ))),
                None => Ok(()),
            },
            Err(e) => {
                *conn = None;
                Err(e)
            }
        }
    }

    /// The refusals (`err` answers) on success.
    fn exchange_on(
        &self,
        conn: &mut Option<OwnedFd>,
        requests: &[(String, Option<BorrowedFd<'_>>)],
        deadline: Instant,
    ) -> io::Result<Vec<String>> {
        if conn.is_none() {
            *conn = Some(self.connect(deadline)?);
        }
        let Some(fd) = conn.as_ref() else {
            return Err(io::Error::other("no connection to the launcher"));
        };
        let sync = protocol::format_request(Request::Sync);
        for (text, attached) in requests
            .iter()
            .map(|(t, f)| (t.as_str(), *f))
            .chain([(sync.as_str(), None)])
        {
            set_timeout(fd.as_fd(), sockopt::SendTimeout, deadline)?;
            let raw = attached.map(|f| [f.as_raw_fd()]);
            let cmsgs: Vec<ControlMessage<'_>> = raw
                .as_ref()
                .map(|r| ControlMessage::ScmRights(r))
                .into_iter()
                .collect();
            socket::sendmsg::<()>(
                fd.as_raw_fd(),
                &[IoSlice::new(text.as_bytes())],
                &cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(|e| self.failed("send to", e.into()))?;
        }
        let mut refusals = Vec::new();
        let mut buf = [0u8; protocol::MAX_REQUEST];
        loop {
            set_timeout(fd.as_fd(), sockopt::ReceiveTimeout, deadline)?;
            let n = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(|e| self.failed("receive from", e.into()))?;
            if n == 0 {
                return Err(self.failed(
                    "receive from",
                    io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"),
                ));
            }
            let answer = String::from_utf8_lossy(&buf[..n]);
            if answer == protocol::OK {
                return Ok(refusals);
            }
            match answer.strip_prefix("err ") {
                Some(reason) => refusals.push(reason.to_owned()),
                None => {
                    return Err(invalid(format!(
                        "unexpected answer from the launcher: {answer:?}"
                    )));
                }
            }
        }
    }

    fn connect(&self, deadline: Instant) -> io::Result<OwnedFd> {
        let path = self.root.join(files::SOCKET);
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        // A full listen backlog makes connect wait; the send timeout bounds that wait.
        set_timeout(fd.as_fd(), sockopt::SendTimeout, deadline)?;
        let addr = UnixAddr::new(&path)?;
        socket::connect(fd.as_raw_fd(), &addr).map_err(|e| self.failed("connect to", e.into()))?;
        Ok(fd)
    }

    fn failed(&self, what: &str, e: io::Error) -> io::Error {
        let e = if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {}s", CLIENT_TIMEOUT.as_secs()),
            )
        } else {
            e
        };
        io::Error::new(
            e.kind(),
            format!(
                "cannot {what} the launcher at {}: {e}",
                self.root.join(files::SOCKET).display()
            ),
        )
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// A poisoned lock only means another thread panicked while holding it; the map and the
/// connection are still consistent (each change is a single insert or replace).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sets a socket timeout to what is left until `deadline` (at least 1 ms: 0 means "never").
fn set_timeout<O>(fd: BorrowedFd<'_>, opt: O, deadline: Instant) -> io::Result<()>
where
    O: socket::SetSockOpt<Val = TimeVal>,
{
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    socket::setsockopt(
        &fd,
        opt,
        &TimeVal::from(libc::timeval {
            tv_sec: left.as_secs() as libc::time_t,
            tv_usec: left.subsec_micros() as libc::suseconds_t,
        }),
    )
    .map_err(io::Error::from)
}
