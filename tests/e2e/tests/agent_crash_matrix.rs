//! Crash matrix: the agent binary (built with `fault-points`) is aborted at every step of an
//! update, as a kill -9 would, then started again. Each case must end with exactly one complete
//! version running (the new one, or the old one with the bad one refused) and a clean journal.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleetcast_agent::fault::POINTS;
use fleetcast_agent::journal::{Journal, Step};
use fleetcast_e2e::{Pipeline, script_app};
use semver::Version;

fn v(s: &str) -> Version {
    Version::parse(s).expect("version")
}

struct Case {
    config: PathBuf,
    data: PathBuf,
    state: PathBuf,
}

impl Case {
    fn new(p: &Pipeline, dir: &Path, name: &str) -> Case {
        let (data, state) = (dir.join(name).join("data"), dir.join(name).join("state"));
        std::fs::create_dir_all(&state).expect("state");
        let config = dir.join(name).join("agent.toml");
        std::fs::write(&config, p.script_agent_config("crash", &data, &state, "")).expect("config");
        Case {
            config,
            data,
            state,
        }
    }

    fn agent(&self, fault: Option<&str>) -> Child {
        let mut cmd = Command::new(fleetcast_e2e::binaries::binary("fleetcast-agent"));
        cmd.arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(point) = fault {
            cmd.env(fleetcast_agent::fault::ENV, point);
        }
        cmd.spawn().expect("start agent")
    }

    fn journal(&self) -> Journal {
        // A journal that does not load after a crash is itself a failure, not a fresh host.
        Journal::load(&self.data.join("apps/shapp")).expect("journal loads after the crash")
    }

    /// Processes of this case's app still alive (found by their environment).
    fn app_processes(&self) -> usize {
        let needle = format!("STATE_DIR={}\0", self.state.display());
        fleetcast_e2e::live_processes()
            .into_iter()
            .filter(|dir| {
                std::fs::read(dir.join("environ"))
                    .is_ok_and(|env| env.windows(needle.len()).any(|w| w == needle.as_bytes()))
            })
            .count()
    }

    /// Whether the app's process is a child of `agent`: the restarted agent has taken over
    /// (until then, what runs may still be what the aborted agent left, which the journal and
    /// the state file alone cannot tell apart).
    fn app_is_child_of(&self, agent: &Child) -> bool {
        let pid = std::fs::read_to_string(self.data.join("apps/shapp/app.pid"))
            .ok()
            .and_then(|t| t.split_whitespace().next().map(String::from));
        let Some(pid) = pid else { return false };
        std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
            status.lines().any(|l| {
                l.split_whitespace().collect::<Vec<_>>() == ["PPid:", &agent.id().to_string()]
            })
        })
    }

    fn running(&self) -> String {
        std::fs::read_to_string(self.state.join("running"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

async fn until(what: &str, check: impl Fn() -> bool) {
    for _ in 0..1200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn stop(mut agent: Child) {
    let pid = nix::unistd::Pid::from_raw(agent.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = agent.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crash_point_ends_with_one_complete_version_running() {
    let p = Pipeline::start().await.expect("pipeline");
    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    // Both updates carry a pre-switch hook (a "migration" that leaves a mark), so the matrix
    // covers the step between it and the switch too.
    let hook = "[hooks.pre_switch]\ncommand = [\"/bin/sh\", \"-c\", \"echo $FLEETCAST_VERSION >> \\\"$STATE_DIR/migrations\\\"\"]\ntimeout = \"10s\"\n";
    p.release(
        "shapp",
        "2.0.0",
        &script_app("2.0.0", true).file("fleetcast.toml", hook, 0o644),
    )
    .await;
    p.release(
        "shapp",
        "3.0.0",
        &script_app("3.0.0", false).file("fleetcast.toml", hook, 0o644),
    )
    .await;
    let dir = tempfile::tempdir().expect("tmp");
    let mut covered = Vec::new();
    // (target, points it passes): a healthy v2 never reaches the rollback points, a crashing
    // v3 never passes its gate.
    for (target, healthy) in [("2.0.0", true), ("3.0.0", false)] {
        for point in POINTS {
            let reached = if healthy {
                !point.starts_with("rollback")
            } else {
                !matches!(*point, "gate-passed" | "committed")
            };
            if !reached {
                continue;
            }
            let case = Case::new(&p, dir.path(), &format!("{target}-{point}"));
            // v1 installed and running.
            p.desire("shapp", "default", "1.0.0").await;
            let agent = case.agent(None);
            until("v1 committed", || {
                case.journal().committed == Some(v("1.0.0")) && case.running() == "1.0.0"
            })
            .await;
            stop(agent);
            assert_eq!(
                case.app_processes(),
                0,
                "{point}: app left running by a clean stop"
            );

            // The update, killed at `point`.
            p.desire("shapp", "default", target).await;
            let mut agent = case.agent(Some(point));
            let status = tokio::task::spawn_blocking(move || agent.wait())
                .await
                .expect("join")
                .expect("wait");
            // Aborted there, and nowhere else (a config it refused would also fail).
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(nix::libc::SIGABRT),
                "{target} {point}: the agent did not stop at its fault point ({status})"
            );

            // Restarted: it finishes or reverts, and converges.
            let agent = case.agent(None);
            let expected = if healthy { v(target) } else { v("1.0.0") };
            until(&format!("{target} {point}: converged"), || {
                let j = case.journal();
                j.step == Step::Idle
                    && j.committed.as_ref() == Some(&expected)
                    && (healthy || j.is_refused(&v(target)))
                    && case.running() == expected.to_string()
                    && case.app_processes() == 1
                    && case.app_is_child_of(&agent)
            })
            .await;
            assert!(
                !case
                    .data
                    .join(format!("apps/shapp/versions/{target}.partial"))
                    .exists(),
                "{point}: partial left behind"
            );
            stop(agent);
            until(
                &format!("{target} {point}: app stopped with the agent"),
                || case.app_processes() == 0,
            )
            .await;
            covered.push(format!("{target}:{point}"));
        }
    }
    assert_eq!(covered.len(), 11 + 13, "{covered:?}");
}
