//! The agent updates itself: real `fleetcast-launcher` and `fleetcast-agent` processes, a real
//! nats-server and pipeline, an app that prints a line every 200 ms. A release of the agent is
//! published like an app's, the running agent hands over to it on trial, the new one adopts the
//! running app (same pid, its output still logged, still supervised) and becomes current; a
//! broken release (exits at start, cannot connect) sends the host back to the agent it ran,
//! which refuses the release and reports why. Then the crash matrix: the agent or the launcher
//! killed at each step of an upgrade ends with exactly one agent and the app never restarted.
//!
//! The releases hold `bin/fleetcast-agent` as a small script that execs the workspace's agent
//! binary (built by [`fleetcast_e2e::binaries`]; or fails as a broken one would): the package
//! stays small, and what is tested (the trial, the adoption, the way back) is the same as with
//! the binary inside.

use fleetcast_events::AgentId;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleetcast_agent::journal::Journal;
use fleetcast_e2e::{Pipeline, rollout_of_in_phase};
use fleetcast_events::v1::{AgentStatus, AppState};
use fleetcast_harness::fixtures::PackageBuilder;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use semver::Version;

fn v(s: &str) -> Version {
    Version::parse(s).expect("version")
}

fn agent_app() -> String {
    fleetcast_events::names::agent_app(std::env::consts::OS, std::env::consts::ARCH)
}

fn launcher_bin() -> PathBuf {
    fleetcast_e2e::binaries::binary("fleetcast-launcher")
}

fn agent_bin() -> PathBuf {
    fleetcast_e2e::binaries::binary("fleetcast-agent")
}

/// An app that says which version runs and prints a numbered line every 200 ms.
fn ticking_app(version: &str) -> PackageBuilder {
    let script = format!(
        "#!/bin/sh\necho {version} > \"$STATE_DIR/running\"\ni=0\nwhile true; do i=$((i+1)); echo \"tick $i\"; sleep 0.2; done\n"
    );
    PackageBuilder::new()
        .file("bin/run", script, 0o755)
        .file("VERSION", version.to_string(), 0o644)
}

/// A release of the agent whose `bin/fleetcast-agent` runs `body` (a shell line).
fn agent_release(body: &str) -> PackageBuilder {
    PackageBuilder::new().file("bin/fleetcast-agent", format!("#!/bin/sh\n{body}\n"), 0o755)
}

fn good_agent() -> PackageBuilder {
    agent_release(&format!("exec {} \"$@\"", agent_bin().display()))
}

struct Host {
    dir: PathBuf,
    config: PathBuf,
    data: PathBuf,
    state: PathBuf,
    root: PathBuf,
    log: PathBuf,
}

impl Host {
    fn new(p: &Pipeline, dir: &Path) -> Host {
        Host::in_ring(p, dir, "default")
    }

    fn in_ring(p: &Pipeline, dir: &Path, ring: &str) -> Host {
        let (data, state, root) = (dir.join("data"), dir.join("state"), dir.join("launcher"));
        std::fs::create_dir_all(&state).expect("state");
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            p.script_agent_config(
                "selfish",
                &data,
                &state,
                &format!(
                    "ring = \"{ring}\"\nfetch_delay = \"0s\"\n[self_update]\nqualify = \"6s\"\nsoak = \"2s\"\n"
                ),
            ),
        )
        .expect("config");
        Host {
            dir: dir.to_path_buf(),
            config,
            data,
            state,
            root,
            log: dir.join("agent.log"),
        }
    }

    fn launcher(&self) -> Launched {
        self.launcher_with(None)
    }

    /// The launcher, its agents aborting at `fault` (the `fault-points` feature).
    fn launcher_with(&self, fault: Option<&str>) -> Launched {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        Command::new(launcher_bin())
            .arg("--root")
            .arg(&self.root)
            .arg("--agent")
            .arg(agent_bin())
            .arg("--")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env("FLEETCAST_LOG_FORMAT", "json")
            .envs(fault.map(|f| (fleetcast_agent::fault::ENV, f)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map(Launched)
            .expect("start the launcher")
    }

    /// The app's pid as the agent recorded it.
    fn app_pid(&self) -> Option<u32> {
        first_word(&self.data.join("apps/shapp/app.pid"))
    }

    fn running(&self) -> String {
        fleetcast_e2e::running(&self.state)
    }

    /// The release the launcher runs (`current`), empty for the installed agent.
    fn current(&self) -> String {
        first_word(&self.root.join("current")).unwrap_or_default()
    }

    fn agent_journal(&self) -> Journal {
        Journal::load(&self.data.join("apps").join(agent_app())).expect("the agent's journal")
    }

    /// The pid of the agent the launcher runs now.
    fn agent_pid(&self) -> Option<i32> {
        first_word(&self.root.join("agent.pid"))
    }

    /// Agent processes of this host (found by their config path), launchers left out.
    fn agents(&self) -> usize {
        processes_with(&self.config)
            .into_iter()
            .filter(|argv0| !argv0.ends_with("fleetcast-launcher"))
            .count()
    }

    /// How many lines the app printed that an agent logged.
    fn ticks_logged(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"shapp\"") && l.contains("tick "))
            .count()
    }

    fn refusal(&self, version: &str) -> Option<String> {
        self.agent_journal()
            .refused
            .iter()
            .find(|(v, _)| v.to_string() == version)
            .map(|(_, reason)| reason.clone())
    }

    fn dump(&self) -> String {
        format!(
            "{}\n--- launcher files: {:?}",
            std::fs::read_to_string(&self.log)
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.contains("tick "))
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .join("\n"),
            std::fs::read_dir(&self.root)
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
                .unwrap_or_default()
        )
    }
}

/// argv[0] of every live (not zombie) process whose command line names `needle`.
fn processes_with(needle: &Path) -> Vec<String> {
    let needle = needle.display().to_string();
    fleetcast_e2e::live_processes()
        .into_iter()
        .filter_map(|dir| std::fs::read(dir.join("cmdline")).ok())
        .filter(|cmdline| {
            cmdline
                .split(|b| *b == 0)
                .any(|arg| String::from_utf8_lossy(arg) == needle)
        })
        .map(|cmdline| {
            String::from_utf8_lossy(cmdline.split(|b| *b == 0).next().unwrap_or_default())
                .to_string()
        })
        .collect()
}

/// The first word of the file at `path`, parsed: a pid file holds "<pid> <start time>".
fn first_word<T: std::str::FromStr>(path: &Path) -> Option<T> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

async fn until(host: &Host, what: &str, check: impl Fn() -> bool) {
    for _ in 0..1200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}\n{}", host.dump());
}

/// A launcher process, stopped as systemd would (SIGTERM: the agent stops its apps) when the
/// test ends, also when it fails.
struct Launched(Child);

impl Launched {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        // Already reaped (killed by the test): its pid may name another process by now.
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGTERM);
        for _ in 0..200 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }
}

/// The host runs the app (1.0.0) under the installed agent; returns the launcher and the app's
/// pid.
async fn started(p: &Pipeline, host: &Host) -> (Launched, u32) {
    p.release("shapp", "1.0.0", &ticking_app("1.0.0")).await;
    p.desire("shapp", "default", "1.0.0").await;
    let launcher = host.launcher();
    until(host, "the app runs 1.0.0", || host.running() == "1.0.0").await;
    until(host, "the app's pid is recorded", || {
        host.app_pid().is_some()
    })
    .await;
    (launcher, host.app_pid().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_updates_itself_adopting_its_app_and_goes_back_from_a_broken_release() {
    let p = Pipeline::start().await.expect("pipeline");
    let dir = tempfile::tempdir().expect("tmp");
    let host = Host::new(&p, dir.path());
    let agent = agent_app();
    p.release(&agent, "2.0.0", &good_agent()).await;
    p.release(
        &agent,
        "3.0.0",
        &agent_release("echo 'cannot start' >&2; exit 3"),
    )
    .await;
    // Starts, but its NATS server is one nobody listens on: it never qualifies.
    p.release(
        &agent,
        "4.0.0",
        &agent_release(&format!(
            "FLEETCAST_AGENT_NATS__URL=nats://127.0.0.1:9 exec {} \"$@\"",
            agent_bin().display()
        )),
    )
    .await;
    let (launcher, app) = started(&p, &host).await;
    assert_eq!(host.agents(), 1);

    // 2.0.0: the host hands over to it, it qualifies, soaks and becomes current.
    p.desire(&agent, "default", "2.0.0").await;
    until(&host, "agent 2.0.0 current and committed", || {
        host.current() == "2.0.0" && host.agent_journal().committed == Some(v("2.0.0"))
    })
    .await;
    assert_eq!(host.app_pid(), Some(app), "the app was not restarted");
    assert_eq!(host.running(), "1.0.0");
    until(&host, "one agent", || host.agents() == 1).await;
    // The app's output is logged on by the new agent (the old one has exited).
    let ticks = host.ticks_logged();
    until(&host, "the app's output still logged", || {
        host.ticks_logged() > ticks + 2
    })
    .await;
    // And it is supervised: killed, it is started again.
    kill(Pid::from_raw(app as i32), Signal::SIGKILL).expect("kill the app");
    until(&host, "the app restarted by the adopting agent", || {
        host.app_pid().is_some_and(|pid| pid != app) && host.running() == "1.0.0"
    })
    .await;
    let app = host.app_pid().unwrap_or_default();

    // 3.0.0 exits at start: the launcher goes back to 2.0.0, which refuses it and says why.
    p.desire(&agent, "default", "3.0.0").await;
    let rolled_back = p
        .wait_status(|s: &AgentStatus| {
            s.app == agent && s.state == AppState::RolledBack && s.version == Some(v("3.0.0"))
        })
        .await
        .expect("rolled_back reported");
    let reason = rolled_back.reason.unwrap_or_default();
    assert!(reason.contains("exited with code 3"), "{reason}");
    assert_eq!(host.current(), "2.0.0");
    until(&host, "one agent", || host.agents() == 1).await;
    assert_eq!(host.app_pid(), Some(app), "the app was not restarted");

    // 4.0.0 cannot connect: it does not qualify in time and the host goes back again.
    p.desire(&agent, "default", "4.0.0").await;
    until(&host, "4.0.0 refused", || host.refusal("4.0.0").is_some()).await;
    let reason = host.refusal("4.0.0").unwrap_or_default();
    assert!(reason.contains("did not qualify"), "{reason}");
    assert_eq!(host.current(), "2.0.0");
    until(&host, "one agent", || host.agents() == 1).await;
    assert_eq!(host.app_pid(), Some(app), "the app was not restarted");
    assert_eq!(host.running(), "1.0.0");

    // The tracker's remedy for an agent that hangs: restart. The launcher starts it again and
    // the app keeps running.
    let before = host.agent_pid();
    let remedy = fleetcast_events::v1::AgentRemedy {
        agent_id: AgentId::from_static("selfish"),
        action: fleetcast_events::v1::RemedyAction::Restart,
        reason: "stuck".into(),
        at: time::OffsetDateTime::now_utc(),
    };
    let bus = p.bus().await.expect("bus");
    bus.client
        .publish(
            fleetcast_events::names::remedy_subject("selfish"),
            serde_json::to_vec(&remedy).expect("json").into(),
        )
        .await
        .expect("publish");
    bus.client.flush().await.expect("flush");
    until(&host, "the agent restarted", || {
        host.agent_pid().is_some_and(|pid| Some(pid) != before) && host.agents() == 1
    })
    .await;
    assert_eq!(host.app_pid(), Some(app), "the app was not restarted");
    drop(launcher);
    until(&host, "no agent left after a stop", || host.agents() == 0).await;
}

/// Where in an upgrade something is killed.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// The new agent, as soon as the launcher started it.
    TrialStarted,
    /// The new agent after it qualified, within its soak.
    TrialSoaking,
    /// The launcher, while the new agent is on trial (a new launcher is started).
    LauncherInTrial,
    /// The launcher while the agent runs with nothing in flight.
    LauncherIdle,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_or_launcher_killed_at_each_step_leaves_one_agent_and_the_app_running() {
    let p = Pipeline::start().await.expect("pipeline");
    let dir = tempfile::tempdir().expect("tmp");
    let host = Host::new(&p, dir.path());
    let agent = agent_app();
    let (mut launcher, app) = started(&p, &host).await;
    let cases = [
        (Kill::TrialStarted, "2.0.1", "before qualifying"),
        (Kill::TrialSoaking, "2.0.2", "within the soak"),
        (Kill::LauncherInTrial, "2.0.3", "interrupted"),
        (Kill::LauncherIdle, "", ""),
    ];
    for (kill_what, version, why) in cases {
        let before = host.agent_pid();
        if !version.is_empty() {
            p.release(&agent, version, &good_agent()).await;
            p.desire(&agent, "default", version).await;
            until(&host, "the trial started", || {
                host.root.join("trial.started").exists()
                    && host.agent_pid().is_some_and(|pid| Some(pid) != before)
            })
            .await;
        }
        match kill_what {
            Kill::TrialStarted => {
                let trial = host.agent_pid().expect("trial pid");
                kill(Pid::from_raw(trial), Signal::SIGKILL).expect("kill the trial");
            }
            Kill::TrialSoaking => {
                until(&host, "the trial qualified", || {
                    host.root.join("trial.qualified").exists()
                })
                .await;
                let trial = host.agent_pid().expect("trial pid");
                kill(Pid::from_raw(trial), Signal::SIGKILL).expect("kill the trial");
            }
            Kill::LauncherInTrial | Kill::LauncherIdle => {
                launcher.kill();
                launcher = host.launcher();
            }
        }
        if version.is_empty() {
            until(&host, "a new agent under the new launcher", || {
                host.agent_pid().is_some_and(|pid| Some(pid) != before) && host.agents() == 1
            })
            .await;
        } else {
            until(&host, "the failed trial refused", || {
                host.refusal(version).is_some()
            })
            .await;
            let reason = host.refusal(version).unwrap_or_default();
            assert!(reason.contains(why), "{kill_what:?}: {reason}");
        }
        until(&host, "exactly one agent", || host.agents() == 1).await;
        assert_eq!(
            host.app_pid(),
            Some(app),
            "{kill_what:?}: the app was not restarted\n{}",
            host.dump()
        );
        assert_eq!(host.running(), "1.0.0");
        assert_eq!(
            host.current(),
            "",
            "{kill_what:?}: still the installed agent"
        );
        let ticks = host.ticks_logged();
        until(&host, "the app's output logged", || {
            host.ticks_logged() > ticks + 2
        })
        .await;
    }
    drop(launcher);
    until(&host, "no agent left after a stop", || host.agents() == 0).await;
    let _ = std::fs::remove_dir_all(&host.dir);
}

/// The agent's release as the tracker rolls it out, like any app's: 2.0.0 completes, with the
/// host's agent version in the fleet view; a broken 3.0.0 is rolled back by the host and its
/// failure halts the rollout, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tracker_rolls_an_agent_release_out_and_halts_a_broken_one() {
    use fleetcast_events::tracker::Command;
    use fleetcast_events::tracker::Phase;
    let mut p = Pipeline::start().await.expect("pipeline");
    p.start_tracker_with(p.tracker_settings());
    let dir = tempfile::tempdir().expect("tmp");
    let host = Host::new(&p, dir.path());
    let agent = agent_app();
    p.release("shapp", "1.0.0", &ticking_app("1.0.0")).await;
    let launcher = host.launcher();
    until(&host, "the app runs 1.0.0", || host.running() == "1.0.0").await;
    let app = host.app_pid().expect("app pid");

    // The rollouts of the agent's releases, as the CLI asks for them.
    let dump = || host.dump();
    p.release(&agent, "2.0.0", &good_agent()).await;
    rollout_of_in_phase(&p, &agent, Some(&v("2.0.0")), Phase::Completed, dump).await;
    assert_eq!(host.current(), "2.0.0");
    let status = p.tracker_command(&Command::Status).await.expect("status");
    let version = status
        .agents
        .iter()
        .find(|a| a.agent_id == "selfish")
        .and_then(|a| a.agent_version.clone());
    assert_eq!(
        version.as_deref(),
        Some("2.0.0"),
        "the fleet view's agent version"
    );

    p.release(&agent, "3.0.0", &agent_release("exit 3")).await;
    let reason = rollout_of_in_phase(&p, &agent, Some(&v("3.0.0")), Phase::Halted, dump)
        .await
        .reason
        .unwrap_or_default();
    assert!(
        reason.contains("selfish") && reason.contains("exited with code 3"),
        "{reason}"
    );
    assert_eq!(host.current(), "2.0.0");
    until(&host, "one agent", || host.agents() == 1).await;
    assert_eq!(host.app_pid(), Some(app), "the app was not restarted");
    drop(launcher);
}

// Only with the agent's fault points (the `fault-points` feature).
fleetcast_agent::with_fault_points! {
    /// The agents aborted (as a kill -9 would) inside the upgrade's own steps: the old one after it
    /// told the launcher to run the trial, before it exited; the new one after it became the
    /// launcher's current, before its journal said so. Each ends with the new agent current and
    /// committed, one agent, the app never restarted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_aborted_inside_its_upgrade_ends_on_the_new_one_with_the_app_running() {
        let p = Pipeline::start().await.expect("pipeline");
        let agent = agent_app();
        p.release(&agent, "2.0.0", &good_agent()).await;
        p.release("shapp", "1.0.0", &ticking_app("1.0.0")).await;
        let dir = tempfile::tempdir().expect("tmp");
        for point in fleetcast_agent::fault::SELF_UPDATE_POINTS {
            // One host per point, each in a ring of its own.
            let host = Host::in_ring(&p, &dir.path().join(point), point);
            p.desire("shapp", point, "1.0.0").await;
            let launcher = host.launcher_with(Some(point));
            until(&host, "the app runs 1.0.0", || host.running() == "1.0.0").await;
            // Committed: an agent killed in the middle of an app's update restarts that app (the
            // update is started afresh), which is not what this test is about.
            until(&host, "the app's 1.0.0 committed", || {
                Journal::load(&host.data.join("apps/shapp"))
                    .is_ok_and(|j| j.committed == Some(v("1.0.0")))
            })
            .await;
            let app = host.app_pid().unwrap_or_default();
            p.desire(&agent, point, "2.0.0").await;
            until(&host, "agent 2.0.0 current and committed", || {
                host.current() == "2.0.0" && host.agent_journal().committed == Some(v("2.0.0"))
            })
            .await;
            let log = std::fs::read_to_string(&host.log).unwrap_or_default();
            assert!(
                log.contains(&format!("fault point {point}: aborting")),
                "{point}: never reached\n{}",
                host.dump()
            );
            until(&host, "one agent", || host.agents() == 1).await;
            assert_eq!(
                host.app_pid(),
                Some(app),
                "{point}: the app was not restarted\n{}",
                host.dump()
            );
            drop(launcher);
            until(&host, "no agent left", || host.agents() == 0).await;
        }
    }
}
