//! The real launcher binary with fake agents (small /bin/sh scripts). Each agent script gets
//! the test's output directory as its first argument (AGENT_ARGS) and records there what it saw.

use std::fs;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use fleetcast_launcher::{ExitRecord, Launcher, TrialFailure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const LAUNCHER: &str = env!("CARGO_BIN_EXE_fleetcast-launcher");
/// Where `from_env_as_an_agent` (run by a launcher) writes what it saw.
const TEST_OUT: &str = "FLEETCAST_LAUNCHER_TEST_OUT";

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("out")).expect("out dir");
        Setup { dir }
    }

    /// Not created: the launcher creates it.
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(
            &path,
            format!("#!/bin/sh\nOUT=\"$1\"\nROOT=\"$FLEETCAST_LAUNCHER_ROOT\"\n{body}\n"),
        )
        .expect("write script");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    fn start(&self, agent: &Path) -> Running {
        self.start_with(agent, &[self.out().into_os_string()])
    }

    fn start_with(&self, agent: &Path, agent_args: &[std::ffi::OsString]) -> Running {
        let log = self.dir.path().join("launcher.log");
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = Command::new(LAUNCHER)
            .arg("--root")
            .arg(self.root())
            .arg("--agent")
            .arg(agent)
            .arg("--")
            .args(agent_args)
            .env(TEST_OUT, self.out())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start the launcher");
        Running {
            child: Some(child),
            log,
        }
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.out().join(name)).unwrap_or_default()
    }

    fn lines(&self, name: &str) -> Vec<String> {
        self.read(name).lines().map(str::to_owned).collect()
    }

    fn root_file(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.root().join(name)).ok()
    }

    /// The pid of the agent the launcher runs now (from agent.pid).
    fn agent_pid(&self) -> Option<i32> {
        self.root_file("agent.pid")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

/// The launcher under test: stopped (SIGTERM, then SIGKILL) when dropped; its log printed when
/// the test failed.
struct Running {
    child: Option<Child>,
    log: PathBuf,
}

impl Running {
    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().map_or(0, |c| c.id() as i32))
    }

    fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal the launcher");
    }

    fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            if self.wait(Duration::from_secs(10)).is_none()
                && let Some(child) = &mut self.child
            {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- launcher log ---\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(20));
    }
}

fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie (state Z after the last `)`) has exited.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn vm_rss_kib(pid: Pid) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// An installed agent that asks once for a trial of `trial_script` as release 2.0, then (when
/// run again, e.g. as the fallback) just runs. Each run appends its release to `a-runs`.
fn agent_requesting_trial(s: &Setup, trial_script: &Path, qualify_secs: u32) -> PathBuf {
    s.script(
        "agent-a",
        &format!(
            r#"echo "run ${{FLEETCAST_LAUNCHER_RELEASE:-none}}" >> "$OUT/a-runs"
if [ ! -e "$OUT/trial-requested" ]; then
    touch "$OUT/trial-requested"
    printf '2.0 %s {qualify_secs} 0\n' '{}' > "$ROOT/trial"
    exit 75
fi
exec sleep 1000"#,
            trial_script.display()
        ),
    )
}

#[test]
fn runs_the_installed_agent_with_its_environment() {
    let s = Setup::new();
    let agent = s.script(
        "agent",
        r#"env > "$OUT/env.tmp"
mv "$OUT/env.tmp" "$OUT/env"
exec sleep 1000"#,
    );
    let launcher = s.start(&agent);
    wait_until("the agent's environment", || s.out().join("env").exists());
    let env = s.read("env");
    let root = fs::canonicalize(s.root()).expect("root");
    assert!(
        env.lines()
            .any(|l| l == format!("FLEETCAST_LAUNCHER_ROOT={}", root.display())),
        "{env}"
    );
    assert!(env.lines().any(|l| l == "FLEETCAST_LAUNCHER_FDS="), "{env}");
    assert!(!env.contains("FLEETCAST_LAUNCHER_RELEASE"), "{env}");
    assert!(!env.contains("FLEETCAST_LAUNCHER_TRIAL"), "{env}");

    let mode = |p: &Path| fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&s.root()), 0o700);
    assert_eq!(mode(&s.root().join("launcher.sock")), 0o600);
    wait_until("agent.pid", || s.agent_pid().is_some());
    let pid = s.agent_pid().expect("agent pid");
    assert!(alive(pid));
    // The launcher blocks SIGTERM, SIGINT and SIGCHLD (for its signalfd) and ignores SIGPIPE:
    // the agent must inherit neither.
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .expect("signal field")
    };
    assert_eq!(field("SigBlk:"), 0, "{status}");
    assert_eq!(
        field("SigIgn:") & (1 << (13 - 1)),
        0,
        "SIGPIPE ignored: {status}"
    );

    // Idle for a moment so the figure is the steady state, not start-up.
    sleep(Duration::from_millis(300));
    let rss = vm_rss_kib(launcher.pid());
    println!(
        "launcher VmRSS: {rss} kB ({} build)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
}

#[test]
fn a_promoted_trial_becomes_current() {
    let s = Setup::new();
    let b = s.script(
        "agent-b",
        r#"echo "${FLEETCAST_LAUNCHER_TRIAL:-0} $FLEETCAST_LAUNCHER_RELEASE" >> "$OUT/b-runs"
if [ "$FLEETCAST_LAUNCHER_TRIAL" = 1 ]; then
    while [ ! -e "$OUT/crash" ]; do sleep 0.05; done
    exit 3
fi
exec sleep 1000"#,
    );
    let a = agent_requesting_trial(&s, &b, 30);
    let _launcher = s.start(&a);
    wait_until("the trial", || !s.lines("b-runs").is_empty());
    assert_eq!(s.lines("b-runs"), ["1 2.0"]);
    assert_eq!(s.lines("a-runs"), ["run none"]);
    let started = s.root_file("trial.started").expect("trial.started");
    assert!(
        started.ends_with(&format!(
            " - {}\n",
            fs::canonicalize(&a).expect("a").display()
        )),
        "{started}"
    );

    // What the trial agent does through the client: qualify, then promote after its soak.
    let client = Launcher::at(&fs::canonicalize(s.root()).expect("root"));
    client.qualified().expect("qualified");
    client.promote().expect("promote");
    fs::write(s.out().join("crash"), "").expect("crash");

    wait_until("the promoted release restarted", || {
        s.lines("b-runs").len() == 2
    });
    assert_eq!(s.lines("b-runs"), ["1 2.0", "0 2.0"]);
    assert_eq!(
        s.root_file("current").as_deref(),
        Some(format!("2.0 {}\n", b.display()).as_str())
    );
    for gone in ["trial", "trial.started", "trial.qualified", "trial.failed"] {
        assert_eq!(s.root_file(gone), None, "{gone}");
    }
    assert_eq!(client.take_trial_failure().expect("no failure"), None);
}

#[test]
fn a_trial_that_exits_goes_back_to_current() {
    let s = Setup::new();
    let b = s.script("agent-b", r#"echo run >> "$OUT/b-runs"; exit 1"#);
    let a = agent_requesting_trial(&s, &b, 30);
    fs::create_dir(s.root()).expect("root");
    fs::write(s.root().join("current"), format!("1.0 {}\n", a.display())).expect("current");
    let _launcher = s.start(&a);

    wait_until("the fallback", || s.lines("a-runs").len() == 2);
    assert_eq!(s.lines("a-runs"), ["run 1.0", "run 1.0"]);
    assert_eq!(s.lines("b-runs"), ["run"]);
    assert_eq!(
        s.root_file("current").as_deref(),
        Some(format!("1.0 {}\n", a.display()).as_str())
    );
    let client = Launcher::at(&s.root());
    assert_eq!(
        client.take_trial_failure().expect("trial.failed"),
        Some(TrialFailure {
            version: "2.0".into(),
            reason: "exited with code 1 before qualifying".into()
        })
    );
    assert_eq!(
        client.take_trial_failure().expect("removed once read"),
        None
    );
    for gone in ["trial", "trial.started", "trial.qualified"] {
        assert_eq!(s.root_file(gone), None, "{gone}");
    }
}

#[test]
fn a_trial_that_does_not_qualify_is_detached_and_fails() {
    let s = Setup::new();
    let b = s.script(
        "agent-b",
        r#"trap 'touch "$OUT/got-usr2"; exit 0' USR2
while :; do sleep 0.05; done"#,
    );
    let a = agent_requesting_trial(&s, &b, 1);
    let _launcher = s.start(&a);

    wait_until("the fallback", || s.lines("a-runs").len() == 2);
    assert!(s.out().join("got-usr2").exists(), "the trial got SIGUSR2");
    assert_eq!(
        s.root_file("current"),
        None,
        "the fallback was the installed agent"
    );
    assert_eq!(
        s.root_file("trial.failed").as_deref(),
        Some("2.0\ndid not qualify within 1s\n")
    );
}

#[test]
fn a_trial_that_cannot_run_fails_with_the_error() {
    let s = Setup::new();
    let b = s.dir.path().join("not-a-program");
    fs::write(&b, [0u8; 64]).expect("garbage");
    fs::set_permissions(&b, fs::Permissions::from_mode(0o755)).expect("chmod");
    let a = agent_requesting_trial(&s, &b, 30);
    let _launcher = s.start(&a);

    wait_until("the fallback", || s.lines("a-runs").len() == 2);
    let failed = s.root_file("trial.failed").expect("trial.failed");
    assert_eq!(
        failed,
        format!(
            "2.0\ncannot run {}: Exec format error (os error 8)\n",
            b.display()
        )
    );
}

#[test]
fn stored_fds_survive_the_agent() {
    let s = Setup::new();
    let agent = s.script(
        "agent",
        r#"echo "$FLEETCAST_LAUNCHER_FDS" >> "$OUT/fds"
if [ -n "$FLEETCAST_LAUNCHER_FDS" ]; then
    head -c 5 <&3 > "$OUT/read.tmp"
    mv "$OUT/read.tmp" "$OUT/read"
fi
exec sleep 1000"#,
    );
    let _launcher = s.start(&agent);
    wait_until("the first agent", || s.agent_pid().is_some());
    let first = s.agent_pid().expect("pid");

    let (read, write) = nix::unistd::pipe().expect("pipe");
    let client = Launcher::at(&s.root());
    client
        .store("app/stdout", read.as_fd())
        .expect("store the read end");
    // A bad name is refused by the client before anything is sent.
    assert!(client.store("bad name", read.as_fd()).is_err());
    client
        .remove("never/stored")
        .expect("removing an unknown name");
    drop(read);
    let mut write = fs::File::from(write);
    write.write_all(b"hello").expect("write into the pipe");

    kill(Pid::from_raw(first), Signal::SIGKILL).expect("kill the agent");
    wait_until("the agent read the stored pipe", || {
        s.out().join("read").exists()
    });
    assert_eq!(s.read("read"), "hello");
    assert_eq!(s.lines("fds"), ["", "3=app/stdout"]);
    assert_ne!(s.agent_pid(), Some(first));
}

#[test]
fn a_bad_request_is_answered_err() {
    use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let s = Setup::new();
    let agent = s.script("agent", "exec sleep 1000");
    let _launcher = s.start(&agent);
    wait_until("the socket", || s.root().join("launcher.sock").exists());
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    let addr = UnixAddr::new(&s.root().join("launcher.sock")).expect("addr");
    socket::connect(fd.as_raw_fd(), &addr).expect("connect");
    let mut answers = Vec::new();
    for request in ["store app/x", "fetch x", "remove a b", "sync"] {
        socket::send(fd.as_raw_fd(), request.as_bytes(), MsgFlags::empty()).expect("send");
    }
    let mut buf = [0u8; 512];
    while answers.last().map(String::as_str) != Some("ok") {
        let n = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).expect("recv");
        answers.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(answers.len(), 4, "{answers:?}");
    assert!(
        answers[0].starts_with("err store app/x: expected exactly one fd"),
        "{answers:?}"
    );
    assert!(answers[1].starts_with("err unknown request"), "{answers:?}");
    assert!(answers[2].starts_with("err name \"a b\""), "{answers:?}");
}

#[test]
fn an_orphan_exit_is_recorded() {
    let s = Setup::new();
    let agent = s.script(
        "agent",
        r#"if [ ! -e "$OUT/spawned" ]; then
    touch "$OUT/spawned"
    sh -c 'sleep 0.3; exit 7' &
    echo $! > "$OUT/orphan.tmp"
    mv "$OUT/orphan.tmp" "$OUT/orphan"
    exit 0
fi
exec sleep 1000"#,
    );
    let _launcher = s.start(&agent);
    wait_until("the orphan", || s.out().join("orphan").exists());
    let orphan: u32 = s.read("orphan").trim().parse().expect("orphan pid");
    let client = Launcher::at(&s.root());
    wait_until("the orphan's exit record", || {
        s.root().join("exits").join(orphan.to_string()).exists()
    });
    let record = s
        .root_file(&format!("exits/{orphan}"))
        .expect("exit record");
    assert!(record.ends_with(" 7 -\n"), "{record}");
    assert_eq!(
        client.exit_status(orphan),
        Some(ExitRecord {
            code: Some(7),
            signal: None
        })
    );
    assert_eq!(client.exit_status(orphan), None, "read once");
}

#[test]
fn sigterm_stops_the_agent_then_the_launcher_and_what_was_left_behind() {
    let s = Setup::new();
    // The agent leaves a process behind in a session of its own (as an app that daemonizes
    // would): the agent's stop does not reach it; the launcher, its reaper, kills it.
    let agent = s.script(
        "agent",
        r#"trap 'touch "$OUT/got-term"; exit 0' TERM
setsid sh -c "echo \$\$ > '$OUT/stray.tmp'; mv '$OUT/stray.tmp' '$OUT/stray'; exec sleep 1000" &
echo started > "$OUT/started"
while :; do sleep 0.05; done"#,
    );
    let mut launcher = s.start(&agent);
    wait_until("the agent", || s.out().join("started").exists());
    wait_until("the stray", || s.out().join("stray").exists());
    let stray: i32 = s.read("stray").trim().parse().expect("stray pid");
    launcher.signal(Signal::SIGTERM);
    let status = launcher
        .wait(Duration::from_secs(20))
        .expect("the launcher exited");
    assert_eq!(status.code(), Some(0));
    assert!(s.out().join("got-term").exists());
    assert!(!alive(stray), "the process left behind is killed");
}

#[test]
fn a_new_launcher_detaches_the_agent_of_a_killed_one() {
    let s = Setup::new();
    let agent = s.script(
        "agent",
        r#"echo $$ >> "$OUT/agents"
trap 'touch "$OUT/usr2-$$"; exit 0' USR2
while :; do sleep 0.05; done"#,
    );
    let mut first = s.start(&agent);
    wait_until("the first agent", || s.lines("agents").len() == 1);
    let old: i32 = s.lines("agents")[0].parse().expect("pid");
    // The launcher records the agent just after starting it: killed before that, the next
    // launcher could not know of it.
    wait_until("agent.pid", || s.agent_pid() == Some(old));
    first.signal(Signal::SIGKILL);
    first.wait(Duration::from_secs(20)).expect("killed");
    assert!(alive(old), "the agent outlives its launcher");

    let _second = s.start(&agent);
    wait_until("the second agent", || s.lines("agents").len() == 2);
    assert!(
        s.out().join(format!("usr2-{old}")).exists(),
        "detached with SIGUSR2"
    );
    let new: i32 = s.lines("agents")[1].parse().expect("pid");
    wait_until("the old agent gone", || !alive(old));
    assert!(alive(new));
    sleep(Duration::from_millis(300));
    assert_eq!(s.lines("agents").len(), 2, "exactly one agent afterwards");
    assert_eq!(s.agent_pid(), Some(new));
}

/// Not a test on its own: the agent `the_client_takes_what_the_launcher_hands` runs (this test
/// binary, filtered to this test, under a launcher). Without a launcher's environment it
/// returns at once.
#[test]
fn from_env_as_an_agent() {
    let Some(launcher) = Launcher::from_env().expect("from_env") else {
        return;
    };
    let out = PathBuf::from(std::env::var_os(TEST_OUT).expect("test out dir"));
    let names = launcher.handed_names().join(",");
    let mut report = format!(
        "release={:?} trial={} names={names}",
        launcher.release(),
        launcher.is_trial()
    );
    if let Some(fd) = launcher.take("app/p") {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
        report += &format!(" cloexec={}", flags & libc::FD_CLOEXEC != 0);
        let mut text = String::new();
        std::io::Read::read_to_string(&mut fs::File::from(fd), &mut text).expect("read");
        report += &format!(" read={text}");
        assert!(launcher.take("app/p").is_none(), "taken once");
    }
    let tmp = out.join("client.tmp");
    fs::write(&tmp, report).expect("report");
    fs::rename(&tmp, out.join(format!("client-{}", std::process::id()))).expect("report");
    // Stays up like an agent (until the launcher stops it).
    sleep(Duration::from_secs(1000));
}

#[test]
fn the_client_takes_what_the_launcher_hands() {
    let s = Setup::new();
    let me = std::env::current_exe().expect("test binary");
    fs::create_dir(s.root()).expect("root");
    fs::write(s.root().join("current"), format!("9.9 {}\n", me.display())).expect("current");
    let args = ["from_env_as_an_agent", "--exact", "--nocapture"].map(std::ffi::OsString::from);
    let _launcher = s.start_with(Path::new("/nonexistent"), &args);
    let reports = || -> Vec<String> {
        let mut r: Vec<String> = fs::read_dir(s.out())
            .expect("out")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("client-"))
            .map(|e| fs::read_to_string(e.path()).expect("report"))
            .collect();
        r.sort();
        r
    };
    wait_until("the first agent's report", || reports().len() == 1);
    assert_eq!(reports(), ["release=Some(\"9.9\") trial=false names="]);

    let (read, write) = nix::unistd::pipe().expect("pipe");
    let client = Launcher::at(&s.root());
    client.store("app/p", read.as_fd()).expect("store");
    drop(read);
    let mut write = fs::File::from(write);
    write.write_all(b"hello").expect("write");
    drop(write);
    wait_until("agent.pid", || s.agent_pid().is_some());
    kill(
        Pid::from_raw(s.agent_pid().expect("agent pid")),
        Signal::SIGKILL,
    )
    .expect("kill the agent");
    wait_until("the second agent's report", || reports().len() == 2);
    assert!(
        reports().contains(
            &"release=Some(\"9.9\") trial=false names=app/p cloexec=true read=hello".to_owned()
        ),
        "{:?}",
        reports()
    );
}
