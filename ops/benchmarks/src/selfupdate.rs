//! The agent updating itself (part of `ops/bench agent`; `ops/bench selfupdate` alone): a host
//! as systemd runs it, `fleetcast-launcher` running the agent as shipped (`agent` profile),
//! which supervises the demo app on a socket it holds (`apps.listen`). A steady loopback load
//! (one `GET /version` after another, a millisecond apart, each given 10 s) runs while the agent
//! takes its own release 2.0.0 (the same binary, packaged as a release: staged, trial,
//! adoption, qualification, soak, promotion) and then a broken 3.0.0 (exits at start), which the
//! launcher takes back.
//!
//! - `agent_upgrade_s`: the old agent hands over (it writes the trial and exits) → the new one
//!   has qualified (connected, state loaded, desired state read, heartbeat published).
//!   `agent_upgrade_old_exit_s`: the part of it until the old agent has exited.
//! - `agent_start_s`: the reference, the same agent started fresh by the launcher → its first
//!   heartbeat received.
//! - `agent_upgrade_app_restarts`: how often the demo app's process changed across both (goal
//!   0); `agent_upgrade_failed_requests` of `agent_upgrade_requests` (goal 0).
//! - `agent_rollback_s`: the broken release's trial started → the previous agent running again
//!   and its rollback reported.
//! - `launcher_rss_mib` (goal ≤ 2) and `launcher_pss_mib` (its share of pages it shares with
//!   other processes, libc's mostly) after both.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use fleetcast_agent::journal::Journal;
use fleetcast_events::SecretKey;
use fleetcast_events::v1::{AgentStatus, AppState};
use futures::StreamExt;

use crate::agent::{next_status, rss_kib, sibling_binary, wait_committed, wait_running};
use crate::ingest::{File, fresh_store, ingest_once, round, start_distributor, write_zip};

pub(crate) async fn run_alone() -> anyhow::Result<String> {
    let dir = tempfile::Builder::new()
        .prefix("fleetcast-bench-selfupdate-")
        .tempdir()?;
    Ok(run(dir.path()).await?.to_string())
}

pub(crate) async fn run(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let bins = Binaries::find()?;
    let agent_app =
        fleetcast_events::names::agent_app(std::env::consts::OS, std::env::consts::ARCH);
    let releases = write_releases(dir, &bins.agent, &agent_app)?;
    let store = store_releases(dir, &releases, &agent_app).await?;
    let mut host = SelfHost::prepare(dir, &store, &bins.demo_app, agent_app).await?;

    eprintln!("self-update: the launcher starts the installed agent");
    let (mut launcher, agent_start) = host.launcher_start(&bins).await?;
    let first_pid = host.web_running(&store.bus).await?;

    let load = crate::handover::Load::start(host.port);

    eprintln!("self-update: agent 2.0.0 under load");
    let upgrade = host.upgrade(&store.bus).await?;
    let mut restarts = host.app_restarted(&first_pid);

    eprintln!("self-update: a broken agent 3.0.0, taken back");
    let rollback = host.rollback(&store.bus).await?;
    restarts += host.app_restarted(&first_pid);
    let (made, failed) = load.finish().await?;
    let rss = rss_kib(launcher.pid(), "VmRSS")?;
    let pss = pss_kib(launcher.pid())?;
    launcher.stop();
    eprintln!(
        "self-update: rolled back ({}), {made} requests, {failed} failed",
        rollback.status.reason.unwrap_or_default()
    );
    Ok(serde_json::json!({
        "agent_upgrade_s": round3(upgrade.upgrade.as_secs_f64()),
        "agent_start_s": round3(agent_start.as_secs_f64()),
        "agent_upgrade_old_exit_s": round3(upgrade.old_exit.as_secs_f64()),
        "agent_upgrade_app_restarts": restarts,
        "agent_upgrade_requests": made,
        "agent_upgrade_failed_requests": failed,
        "agent_rollback_s": round3(rollback.rollback.as_secs_f64()),
        "launcher_rss_mib": round(rss as f64 / 1024.0),
        "launcher_pss_mib": round(pss as f64 / 1024.0),
    }))
}

/// The programs this part runs, as `ops/bench` built them.
struct Binaries {
    agent: PathBuf,
    launcher: PathBuf,
    demo_app: PathBuf,
}

impl Binaries {
    /// The agent, the launcher and the demo app, next to this binary.
    fn find() -> anyhow::Result<Binaries> {
        Ok(Binaries {
            agent: sibling_binary("fleetcast-agent")?,
            launcher: sibling_binary("fleetcast-launcher")?,
            demo_app: sibling_binary("fleetcast-demo-app")?,
        })
    }
}

/// The releases this part stores.
struct Releases {
    /// The agent itself, as release 2.0.0.
    good: PathBuf,
    /// An agent 3.0.0 that exits at start.
    broken: PathBuf,
    /// The web app's 1.0.0.
    web: PathBuf,
}

/// The store the agent fetches from: its server and a connection, and the signing key.
struct Store {
    bus: fleetcast_cli::CliBus,
    nats: fleetcast_harness::NatsServer,
    key: SecretKey,
}

/// The host the launcher runs on: its folders, its web app's port, the agent's reports.
struct SelfHost {
    data: PathBuf,
    /// The launcher's folder.
    root: PathBuf,
    config: PathBuf,
    port: u16,
    agent_app: String,
    beats: async_nats::Subscriber,
    statuses: async_nats::Subscriber,
}

/// The agent's upgrade to 2.0.0, from the trial files' times.
struct Upgrade {
    /// Handed over → the new agent qualified.
    upgrade: Duration,
    /// Handed over → the old agent exited.
    old_exit: Duration,
}

/// The broken 3.0.0 taken back.
struct Rollback {
    /// Its desired state → its rollback reported.
    rollback: Duration,
    /// The rollback report.
    status: AgentStatus,
}

/// The agent as release 2.0.0, a broken agent 3.0.0 and the web app, as zips in `dir`.
fn write_releases(dir: &Path, agent_bin: &Path, agent_app: &str) -> anyhow::Result<Releases> {
    let releases = dir.join("selfupdate-releases");
    std::fs::create_dir_all(&releases)?;
    let agent_release = |version: &str, program: Vec<u8>| -> anyhow::Result<PathBuf> {
        let zip = releases.join(format!("{agent_app}-{version}.zip"));
        write_zip(&[File::bin("bin/fleetcast-agent", program)], &zip)?;
        Ok(zip)
    };
    let good = agent_release("2.0.0", std::fs::read(agent_bin)?)?;
    let broken = agent_release(
        "3.0.0",
        b"#!/bin/sh\necho 'cannot start' >&2\nexit 3\n".to_vec(),
    )?;
    let web = releases.join("web-1.0.0.zip");
    write_zip(&[File::text("VERSION", "1.0.0")], &web)?;
    Ok(Releases { good, broken, web })
}

/// A fresh store with the releases in it.
async fn store_releases(dir: &Path, releases: &Releases, agent_app: &str) -> anyhow::Result<Store> {
    let key = SecretKey::generate()?;
    let (nats, settings, bus) = fresh_store().await?;
    let distributor = start_distributor(&settings, &key, &dir.join("selfupdate-work"));
    ingest_once(&bus, &key, &releases.web, "web", "1.0.0").await?;
    ingest_once(&bus, &key, &releases.good, agent_app, "2.0.0").await?;
    ingest_once(&bus, &key, &releases.broken, agent_app, "3.0.0").await?;
    distributor.cancel();
    Ok(Store { bus, nats, key })
}

impl SelfHost {
    /// Writes the agent's config (the web app on a socket it holds); subscribes to its reports.
    async fn prepare(
        dir: &Path,
        store: &Store,
        demo_app: &Path,
        agent_app: String,
    ) -> anyhow::Result<SelfHost> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let data = dir.join("selfupdate-host");
        let root = data.join("launcher");
        let config = dir.join("selfupdate-agent.toml");
        std::fs::write(
            &config,
            format!(
                "agent_id = \"self\"\ndata_dir = \"{}\"\ntrusted_keys = [\"{}\"]\nheartbeat = \"1s\"\n\
                 [self_update]\nqualify = \"60s\"\nsoak = \"2s\"\n\
                 [nats]\nurl = \"{}\"\ninsecure_dev = true\n{}",
                data.display(),
                store.key.public().to_text().trim(),
                store.nats.url(),
                crate::agent::demo_app_config("web", port, true, "", 2000, demo_app),
            ),
        )?;
        let statuses = store
            .bus
            .client
            .subscribe(fleetcast_events::names::ALL_AGENT_STATUSES)
            .await?;
        let beats = store
            .bus
            .client
            .subscribe(fleetcast_events::names::agent_heartbeat_subject(
                "self", "default",
            ))
            .await?;
        Ok(SelfHost {
            data,
            root,
            config,
            port,
            agent_app,
            beats,
            statuses,
        })
    }

    /// `agent_start_s`: the launcher started → the installed agent's first heartbeat.
    async fn launcher_start(&mut self, bins: &Binaries) -> anyhow::Result<(Launcher, Duration)> {
        let started = Instant::now();
        let launcher = Launcher::spawn(&bins.launcher, &self.root, &bins.agent, &self.config)?;
        tokio::time::timeout(Duration::from_secs(60), self.beats.next())
            .await
            .context("no heartbeat from the agent the launcher started")?;
        Ok((launcher, started.elapsed()))
    }

    /// The web app's 1.0.0 running and committed: its process id.
    async fn web_running(&mut self, bus: &fleetcast_cli::CliBus) -> anyhow::Result<String> {
        crate::agent::desire(bus, "web", &semver::Version::new(1, 0, 0)).await?;
        wait_running(&mut self.statuses, "web", "1.0.0").await?;
        wait_committed(&self.data.join("apps/web"), "1.0.0").await?;
        self.app_pid().context("no app pid")
    }

    /// The web app's process id, from its pid file.
    fn app_pid(&self) -> Option<String> {
        std::fs::read_to_string(self.data.join("apps/web/app.pid"))
            .ok()
            .and_then(|t| t.split_whitespace().next().map(String::from))
    }

    /// 1 when the web app's process is no longer `first_pid`, else 0.
    fn app_restarted(&self, first_pid: &str) -> u64 {
        u64::from(self.app_pid().as_deref() != Some(first_pid))
    }

    /// The agent takes its own release 2.0.0: hand-over → qualified, until committed.
    async fn upgrade(&mut self, bus: &fleetcast_cli::CliBus) -> anyhow::Result<Upgrade> {
        crate::agent::desire(bus, &self.agent_app, &semver::Version::new(2, 0, 0)).await?;
        let (handed_over, trial_started, qualified) = trial_times(&self.root).await?;
        let upgrade = qualified.duration_since(handed_over)?;
        let old_exit = trial_started.duration_since(handed_over)?;
        wait_committed(&self.data.join("apps").join(&self.agent_app), "2.0.0").await?;
        Ok(Upgrade { upgrade, old_exit })
    }

    /// `agent_rollback_s`: the broken 3.0.0 desired → its rollback reported (2.0.0 committed).
    async fn rollback(&mut self, bus: &fleetcast_cli::CliBus) -> anyhow::Result<Rollback> {
        let agent_app = self.agent_app.as_str();
        let trial_seen = Instant::now();
        crate::agent::desire(bus, agent_app, &semver::Version::new(3, 0, 0)).await?;
        let rolled_back: AgentStatus = loop {
            let s = next_status(&mut self.statuses).await?;
            let three = s.version.as_ref().is_some_and(|v| v.major == 3);
            if s.app == agent_app && three && s.state == AppState::RolledBack {
                break s;
            }
            if s.app == agent_app && three && s.state == AppState::Running {
                bail!("the broken agent 3.0.0 became current");
            }
        };
        let rollback = trial_seen.elapsed();
        let journal = Journal::load(&self.data.join("apps").join(agent_app))?;
        if journal.committed != Some(semver::Version::new(2, 0, 0)) {
            bail!(
                "after the rollback the agent journal commits {:?}",
                journal.committed
            );
        }
        Ok(Rollback {
            rollback,
            status: rolled_back,
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// When the running agent wrote the trial (just before it exits), when the launcher started
/// the new agent (once the old one had exited) and when the new agent said it qualified, from the files' times (watched until the trial is promoted and they go).
async fn trial_times(root: &Path) -> anyhow::Result<(SystemTime, SystemTime, SystemTime)> {
    let (mut written, mut started, mut qualified) = (None, None, None);
    for _ in 0..60_000 {
        written = written.or_else(|| modified(&root.join("trial")));
        started = started.or_else(|| modified(&root.join("trial.started")));
        qualified = qualified.or_else(|| modified(&root.join("trial.qualified")));
        if let (Some(w), Some(s), Some(q)) = (written, started, qualified) {
            return Ok((w, s, q));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    bail!("the trial never qualified (written {written:?})")
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Proportional set size: each shared page counted as a share of the processes mapping it.
fn pss_kib(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no Pss in smaps_rollup")
}

/// The launcher as systemd runs it; stopped (SIGTERM: the agent stops the app) when dropped.
struct Launcher(Child);

impl Launcher {
    fn spawn(bin: &Path, root: &Path, agent: &Path, config: &Path) -> anyhow::Result<Launcher> {
        Command::new(bin)
            .arg("--root")
            .arg(root)
            .arg("--agent")
            .arg(agent)
            .arg("--")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", crate::agent::agent_log_filter())
            .stdout(Stdio::null())
            .spawn()
            .map(Launcher)
            .with_context(|| format!("starting {} (ops/bench builds it)", bin.display()))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn stop(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        self.stop();
    }
}
