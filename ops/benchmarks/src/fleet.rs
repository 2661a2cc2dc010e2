//! Fleet benchmark: a tracker and `FLEETCAST_BENCH_AGENTS` (default 1,000) real agent instances
//! in this process (each with its own NATS connection, install folder and journal), each
//! supervising a trivial real process (`sleep`). v1 (1 MiB of random data) is rolled out, then
//! v2 with that MiB replaced, one ring, no concurrency limit.
//!
//! - `announce_p100_ms`: v2's desired state written (the server's timestamp on the KV entry) →
//!   the last agent's first reaction to it (the time on its `downloading` status, sent once it
//!   has checked the announcement's signature).
//! - `announce_floor_ms`, same run (median of three, before v2): one message published to as
//!   many plain clients, each with its own connection in the agents' processes → the last one
//!   to get it. What the server and this machine take to reach 1,000 connections at all.
//! - `converge_s`: v2's signed release published to the distributor → the tracker sees every
//!   agent running v2 (its rollout completed with all of them done).
//! - `floor_s`, same run: as many plain clients, each with its own connection, fetching the
//!   same changed chunks straight from NATS by direct get.
//! - `cpu_s`: user + system CPU of this process and nats-server during the v2 rollout.
//!
//! The agents' folders are in /dev/shm when it exists (see `hosts_dir` below).
//!
//! `FLEETCAST_BENCH_SECURE=1` runs the same fleet closed, as production does: nats-server from
//! the shipped `ops/nats/secure.conf` with the accounts and TLS `ops/nats/gen-accounts --tls`
//! issues, every agent under its own identity (one credential each), the distributor and tracker
//! under their roles (the tracker's replies as `tracker-reply`), and the references' plain
//! clients over TLS too, so each ratio compares like with like. Its `converge_vs_floor` against a
//! run without it is the cost of authentication and TLS.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fleetcast_events::names::{chunk_subject, desired_key};
use fleetcast_events::tracker::Command;
use fleetcast_events::tracker::Phase;
use fleetcast_events::tree::ChunkList;
use fleetcast_events::v1::{AgentStatus, AppState};
use fleetcast_events::{Encoding, SecretKey};
use fleetcast_harness::fixtures::pseudo_random;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::agent::cpu_ticks;
use crate::ingest::{File, fresh_store, ingest_once, round, start_distributor, tree_of, write_zip};
use fleetcast_cli::CliBus;
use fleetcast_harness::NatsServer;
use fleetcast_harness::accounts::{Accounts, AgentSpec};
use fleetcast_runtime::{Bus, NatsSettings, TlsSettings};

/// The fleet's NATS server, and the identities its programs use when it runs closed.
struct FleetNats {
    server: NatsServer,
    /// `None`: the bench's own open server on 127.0.0.1 (insecure_dev).
    accounts: Option<Accounts>,
}

impl FleetNats {
    /// Open, or (`secure`) from the shipped secure.conf with `agents` agents issued.
    async fn start(secure: bool, agents: usize) -> anyhow::Result<(FleetNats, CliBus)> {
        if !secure {
            let (server, _, bus) = fresh_store().await?;
            return Ok((
                FleetNats {
                    server,
                    accounts: None,
                },
                bus,
            ));
        }
        let specs: Vec<AgentSpec> = (0..agents)
            .map(|i| AgentSpec::new(&agent_id(i), "default", &["fleet"]))
            .collect();
        let accounts = Accounts::generate_with_tls(&specs)?;
        let server =
            NatsServer::start_shipped("secure.conf", &accounts, &accounts.creds("admin")).await?;
        let nats = FleetNats {
            server,
            accounts: Some(accounts),
        };
        let admin = nats.as_role("admin");
        let bus = Bus::connect(&admin, "bench", &CancellationToken::new()).await?;
        Ok((nats, CliBus::on(bus, &admin.url, admin.request_timeout)))
    }

    /// Settings for a program with `role`'s credentials (open: no credentials).
    fn as_role(&self, role: &str) -> NatsSettings {
        self.with_credentials(self.accounts.as_ref().map(|a| a.creds(role)))
    }

    fn with_credentials(&self, credentials: Option<std::path::PathBuf>) -> NatsSettings {
        NatsSettings {
            url: self.server.url(),
            request_timeout: Duration::from_secs(30),
            insecure_dev: self.accounts.is_none(),
            credentials,
            tls: self
                .accounts
                .as_ref()
                .and_then(|a| a.ca())
                .map(|ca_file| TlsSettings {
                    ca_file,
                    cert_file: None,
                    key_file: None,
                }),
            ..Default::default()
        }
    }
}

fn agent_id(i: usize) -> String {
    format!("a{i:05}")
}

/// A plain client for the references: as `settings` says (credentials and TLS when closed).
async fn plain_client(settings: &NatsSettings) -> anyhow::Result<async_nats::Client> {
    if settings.insecure_dev {
        return Ok(async_nats::connect(settings.url.as_str()).await?);
    }
    let (client, _) =
        fleetcast_runtime::bus::connect(settings, "bench-reference", &CancellationToken::new())
            .await?;
    Ok(client)
}

pub async fn run() -> anyhow::Result<String> {
    let mut fleet = Fleet::start().await?;
    let packages = fleet.write_packages()?;

    eprintln!("v1 to every agent");
    ingest_once(&fleet.bus, &fleet.key, &packages.v1_zip, "fleet", "1.0.0").await?;
    wait_completed(&fleet.bus, "1.0.0", fleet.agents).await?;

    let announce_floor_ms = announce_floor_median(&fleet.bus, fleet.agents).await;
    eprintln!("v2 to every agent");
    // Open until the end of the run: the floor runs with the same subscriptions as the rollout.
    let mut watch = fleet.watch_v2().await?;
    let v2 = fleet.roll_out_v2(&mut watch, &packages.v2_zip).await?;
    let floor = fleet.chunks_floor(&packages).await?;
    fleet.stop().await;

    let json = figures(&fleet, announce_floor_ms, &v2, floor);
    Ok(json.to_string())
}

/// What the fleet benchmark's phases share: its servers, its agents processes and its key.
///
/// Its fields drop in the order declared: the agents processes (their stdin closing stops them),
/// the tracker, the connection, the server, then the folders.
struct Fleet {
    agents: usize,
    secure: bool,
    processes: usize,
    /// The agents processes; taken when they are stopped.
    children: Vec<tokio::process::Child>,
    /// Their ids, taken at start.
    pids: Vec<u32>,
    tracker: tokio::task::JoinHandle<Result<(), fleetcast_tracker::TrackerError>>,
    shutdown: CancellationToken,
    distributor: CancellationToken,
    bus: CliBus,
    nats: FleetNats,
    key: SecretKey,
    /// The agents' folders, removed when the fleet is dropped.
    _hosts: tempfile::TempDir,
    dir: tempfile::TempDir,
}

/// v1 and v2 of the fleet's app, 1 MiB of random data each.
struct Packages {
    v1_zip: std::path::PathBuf,
    v2_zip: std::path::PathBuf,
}

/// The fleet's desired state and every agent's reports, watched through the v2 rollout.
struct V2Watch {
    statuses: async_nats::Subscriber,
    desired: async_nats::jetstream::kv::Watch,
}

/// What the timed v2 rollout measured.
struct V2Rollout {
    /// Release published → the tracker sees every agent done.
    converge: Duration,
    /// Release published → its desired state written.
    desired_s: f64,
    /// Release published → every agent reported v2 running.
    all_running_s: f64,
    reports: V2Reports,
    cpu_before: u64,
    cpu_after: u64,
}

/// Every agent's reports on v2, in milliseconds after its desired state was written.
struct V2Reports {
    /// Each agent's first `downloading`: its reaction to the announcement.
    reactions_ms: Vec<i128>,
    /// Every report, by state.
    phases: std::collections::BTreeMap<String, Vec<i128>>,
}

impl Fleet {
    /// Starts the server, distributor, tracker and agents processes; until the tracker knows all.
    async fn start() -> anyhow::Result<Fleet> {
        let agents: usize = std::env::var("FLEETCAST_BENCH_AGENTS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1000);
        let dir = tempfile::Builder::new()
            .prefix("fleetcast-bench-fleet-")
            .tempdir()?;
        let hosts = hosts_dir()?;
        let secure = std::env::var("FLEETCAST_BENCH_SECURE").is_ok_and(|v| v == "1");
        let key = SecretKey::generate()?;
        if secure {
            eprintln!("closed: shipped secure.conf, {agents} agent identities, TLS");
        }
        let (nats, bus) = FleetNats::start(secure, agents).await?;
        let distributor =
            start_distributor(&nats.as_role("distributor"), &key, &dir.path().join("work"));
        let shutdown = CancellationToken::new();
        let tracker = start_tracker(&nats, shutdown.clone());
        let (processes, children) = spawn_agents_processes(&nats, &hosts, &key, agents)?;
        let pids: Vec<u32> = children.iter().filter_map(|c| c.id()).collect();
        wait_known(&bus, agents).await?;
        Ok(Fleet {
            agents,
            secure,
            processes,
            children,
            pids,
            tracker,
            shutdown,
            distributor,
            bus,
            nats,
            key,
            _hosts: hosts,
            dir,
        })
    }

    /// User + system CPU ticks of this process, nats-server and the agents processes.
    fn cpu_ticks(&self) -> anyhow::Result<u64> {
        let mut ticks = cpu_ticks(std::process::id())?
            + cpu_ticks(self.nats.server.pid().context("nats pid")?)?;
        for pid in &self.pids {
            ticks += cpu_ticks(*pid)?;
        }
        Ok(ticks)
    }

    /// v1 and v2 as zips in the bench's folder.
    fn write_packages(&self) -> anyhow::Result<Packages> {
        let v1 = vec![File::bin("data.bin", pseudo_random(1 << 20, 1))];
        let v2 = vec![File::bin("data.bin", pseudo_random(1 << 20, 2))];
        let (v1_zip, v2_zip) = (
            self.dir.path().join("fleet-1.zip"),
            self.dir.path().join("fleet-2.zip"),
        );
        write_zip(&v1, &v1_zip)?;
        write_zip(&v2, &v2_zip)?;
        Ok(Packages { v1_zip, v2_zip })
    }

    /// The fleet's desired state and every agent's reports, watched from before v2.
    async fn watch_v2(&self) -> anyhow::Result<V2Watch> {
        let desired = self
            .bus
            .desired()
            .await?
            .store()
            .watch(desired_key("fleet", "default"))
            .await?;
        let statuses = self
            .bus
            .client
            .subscribe(fleetcast_events::names::ALL_AGENT_STATUSES)
            .await?;
        Ok(V2Watch { statuses, desired })
    }

    /// Timed: v2 published → every agent runs it → the tracker sees it completed; the CPU spent.
    async fn roll_out_v2(
        &self,
        watch: &mut V2Watch,
        v2_zip: &std::path::Path,
    ) -> anyhow::Result<V2Rollout> {
        let (agents, bus) = (self.agents, &self.bus);
        let cpu_before = self.cpu_ticks()?;
        let start = Instant::now();
        ingest_once(bus, &self.key, v2_zip, "fleet", "2.0.0").await?;
        let desired_at = v2_desired_written(&mut watch.desired).await?;
        let desired_s = start.elapsed().as_secs_f64();
        let reports = v2_reports(&mut watch.statuses, agents, desired_at).await?;
        let all_running_s = start.elapsed().as_secs_f64();
        wait_completed(bus, "2.0.0", agents).await?;
        let converge = start.elapsed();
        let cpu_after = self.cpu_ticks()?;
        Ok(V2Rollout {
            converge,
            desired_s,
            all_running_s,
            reports,
            cpu_before,
            cpu_after,
        })
    }

    /// `floor_s`: as many plain clients as agents fetching v2's changed chunks.
    async fn chunks_floor(&self, packages: &Packages) -> anyhow::Result<Duration> {
        let agents = self.agents;
        eprintln!("floor: {agents} plain clients fetching the changed chunks");
        let changed = changed_chunks(&packages.v1_zip, &packages.v2_zip)?;
        floor(&self.nats.as_role("admin"), self.agents, &changed).await
    }

    /// Stops the agents processes, the tracker and the distributor.
    async fn stop(&mut self) {
        // Closing their stdin stops the agents processes.
        for mut child in std::mem::take(&mut self.children) {
            drop(child.stdin.take());
            let _ = child.wait().await;
        }
        self.shutdown.cancel();
        let _ = (&mut self.tracker).await;
        self.distributor.cancel();
    }
}

/// The agents' install folders: in memory when possible.
fn hosts_dir() -> anyhow::Result<tempfile::TempDir> {
    // The agents' install folders live in memory when possible: 1,000 simulated hosts share one
    // disk here, and their fsyncs (journal, files) would queue behind each other as they never
    // do on 1,000 real hosts.
    let hosts = tempfile::Builder::new()
        .prefix("fleetcast-bench-hosts-")
        .tempdir_in("/dev/shm")
        .or_else(|_| {
            tempfile::Builder::new()
                .prefix("fleetcast-bench-hosts-")
                .tempdir()
        })?;
    Ok(hosts)
}

/// The tracker, in this process, under its role (its replies as `tracker-reply` when closed).
fn start_tracker(
    nats: &FleetNats,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), fleetcast_tracker::TrackerError>> {
    let s = fleetcast_tracker::Settings {
        nats: nats.as_role("tracker"),
        reply_credentials: nats.accounts.as_ref().map(|a| a.creds("tracker-reply")),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        tick: Duration::from_millis(200),
        stale_after: Duration::from_secs(120),
        ..Default::default()
    };
    tokio::spawn(async move { fleetcast_tracker::run(s, shutdown).await })
}

/// Spawns the processes that each run a share of the agents (see [`run_agents`]): how many, them.
fn spawn_agents_processes(
    fleet_nats: &FleetNats,
    hosts: &tempfile::TempDir,
    key: &SecretKey,
    agents: usize,
) -> anyhow::Result<(usize, Vec<tokio::process::Child>)> {
    // The agents run in a few processes of their own, as the hosts' agents would: one process
    // holding all of them would make every app start copy and close its thousands of file
    // descriptors, and share one allocator and scheduler. Eight processes of 125 agents rather
    // than four of 250: with four, perf showed a core idle for milliseconds of the announcement while a
    // process waited for its turn on the other; eight spread more evenly (announce_p100_ms
    // 37-45 against 43-49, interleaved runs).
    let processes: usize = std::env::var("FLEETCAST_BENCH_AGENT_PROCESSES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8)
        .clamp(1, agents.max(1));
    eprintln!("starting {agents} agents in {processes} processes");
    let mut children = Vec::new();
    for p in 0..processes {
        let (from, to) = (agents * p / processes, agents * (p + 1) / processes);
        children.push(
            tokio::process::Command::new(std::env::current_exe()?)
                .arg(AGENTS_COMMAND)
                .env("FLEETCAST_BENCH_FLEET_NATS", fleet_nats.server.url())
                // Closed: where each agent's credentials and the CA are (gen-accounts' folder).
                .env(
                    "FLEETCAST_BENCH_FLEET_ACCOUNTS",
                    fleet_nats
                        .accounts
                        .as_ref()
                        .map(|a| a.dir().as_os_str().to_owned())
                        .unwrap_or_default(),
                )
                .env("FLEETCAST_BENCH_FLEET_HOSTS", hosts.path())
                .env("FLEETCAST_BENCH_FLEET_KEY", key.public().to_text())
                .env("FLEETCAST_BENCH_FLEET_RANGE", format!("{from}..{to}"))
                // Not killed when the bench fails: its stdin closing stops it, and it stops its
                // agents' apps first (a killed agent leaves them running, by design).
                .stdin(std::process::Stdio::piped())
                .spawn()
                .context("starting an agents process")?,
        );
    }
    Ok((processes, children))
}

/// `announce_floor_ms`: the median of three [`announce_floor`]s; `None` when none was measured.
async fn announce_floor_median(bus: &CliBus, agents: usize) -> Option<i128> {
    let mut floors = Vec::new();
    for _ in 0..3 {
        // Only a reference: the run goes on without it.
        match announce_floor(bus, agents).await {
            Ok(ms) => floors.push(ms),
            Err(e) => eprintln!("announce floor not measured: {e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("announce floor: {floors:?} ms");
    (!floors.is_empty()).then(|| percentile(&floors, 50))
}

/// When the server stored v2's desired state, from the watch of the fleet's desired key.
async fn v2_desired_written(
    desired: &mut async_nats::jetstream::kv::Watch,
) -> anyhow::Result<time::OffsetDateTime> {
    loop {
        let entry = desired.next().await.context("desired watch ended")??;
        let d: fleetcast_events::v1::DesiredState = Encoding::Json.decode(&entry.value)?;
        if d.version == semver::Version::new(2, 0, 0) {
            // When the server stored it (same clock as the agents' reports).
            return Ok(entry.created);
        }
    }
}

/// Every agent's reports on v2, until each runs it (within 10 minutes).
async fn v2_reports(
    statuses: &mut async_nats::Subscriber,
    agents: usize,
    desired_at: time::OffsetDateTime,
) -> anyhow::Result<V2Reports> {
    // Every agent's reports on v2, until each runs it: when each state was last entered, so
    // the figures say where the time goes. The first `downloading` is an agent's reaction.
    let mut reacted = HashSet::new();
    let mut running = HashSet::new();
    let mut reports = V2Reports {
        reactions_ms: Vec::with_capacity(agents),
        phases: Default::default(),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while running.len() < agents {
        let msg = tokio::time::timeout_at(deadline, statuses.next())
            .await
            .context("not every agent ran v2 within 10 minutes")?
            .context("status subscription ended")?;
        let s: AgentStatus =
            fleetcast_runtime::consume::decode_payload(msg.headers.as_ref(), &msg.payload)?;
        if s.version != Some(semver::Version::new(2, 0, 0)) {
            continue;
        }
        reports
            .phases
            .entry(format!("{:?}", s.state))
            .or_default()
            .push((s.at - desired_at).whole_milliseconds());
        match s.state {
            AppState::Downloading if reacted.insert(s.agent_id.clone()) => {
                reports
                    .reactions_ms
                    .push((s.at - desired_at).whole_milliseconds().max(0));
            }
            AppState::Running => {
                running.insert(s.agent_id);
            }
            _ => {}
        }
    }
    Ok(reports)
}

/// The ids of v2's chunks that v1 does not have.
fn changed_chunks(
    v1_zip: &std::path::Path,
    v2_zip: &std::path::Path,
) -> anyhow::Result<Vec<String>> {
    let chunk_ids = |zip: &std::path::Path| -> anyhow::Result<Vec<String>> {
        Ok(tree_of(zip)?
            .0
            .into_iter()
            .flat_map(|f| match f.chunks {
                ChunkList::Listed(list) => list.into_iter().map(|c| c.id).collect(),
                ChunkList::Tree { .. } => Vec::new(),
            })
            .collect())
    };
    let old_ids: HashSet<String> = chunk_ids(v1_zip)?.into_iter().collect();
    Ok(chunk_ids(v2_zip)?
        .into_iter()
        .filter(|id| !old_ids.contains(id))
        .collect())
}

/// The benchmark's JSON object.
fn figures(
    fleet: &Fleet,
    announce_floor_ms: Option<i128>,
    v2: &V2Rollout,
    floor: Duration,
) -> serde_json::Value {
    let (reactions_ms, converge) = (&v2.reports.reactions_ms, v2.converge);
    serde_json::json!({
        "agents": fleet.agents,
        "delta_mib": 1,
        "announce_p100_ms": percentile(reactions_ms, 100),
        "announce_floor_ms": announce_floor_ms,
        "announce_vs_floor": announce_floor_ms
            .map(|f| round(percentile(reactions_ms, 100) as f64 / (f.max(1) as f64))),
        "converge_s": round3(converge.as_secs_f64()),
        "floor_s": round3(floor.as_secs_f64()),
        "converge_vs_floor": round(converge.as_secs_f64() / floor.as_secs_f64().max(1e-3)),
        "cpu_s": round((v2.cpu_after - v2.cpu_before) as f64 / 100.0),
        // Where converge_s goes: release published → desired state written → every agent's
        // last report of each state (seconds after the desired state) → all running → tracker.
        "breakdown": {
            "desired_written_s": round3(v2.desired_s),
            "reports_after_desired_ms": v2.reports.phases
                .iter()
                .map(|(state, ms)| {
                    let spread = serde_json::json!({
                        "reports": ms.len(),
                        "p50": percentile(ms, 50),
                        "p90": percentile(ms, 90),
                        "p100": percentile(ms, 100),
                    });
                    (state.clone(), spread)
                })
                .collect::<serde_json::Map<_, _>>(),
            "all_running_s": round3(v2.all_running_s),
        },
        "agent_processes": fleet.processes,
        "closed": fleet.secure,
        "supervised": "one /bin/sleep process per agent",
    })
}

/// The `p`th percentile (nearest rank) of `values`; 0 for none.
fn percentile(values: &[i128], p: usize) -> i128 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    match sorted.len() {
        0 => 0,
        n => sorted[((n * p).div_ceil(100)).clamp(1, n) - 1],
    }
}

/// The announcement floor: a message on this subject, each plain listener publishes on
/// [`HEARD_SUBJECT`] when (its wall clock, nanoseconds) it got it.
const ANNOUNCE_SUBJECT: &str = "fleetcast-bench.announce";
const HEARD_SUBJECT: &str = "fleetcast-bench.heard";

/// One message published to `n` plain listeners (see [`run_agents`]) → the last one to hear it.
async fn announce_floor(bus: &fleetcast_cli::CliBus, n: usize) -> anyhow::Result<i128> {
    let mut heard = bus.client.subscribe(HEARD_SUBJECT).await?;
    bus.client.flush().await?;
    let sent = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    bus.client.publish(ANNOUNCE_SUBJECT, "".into()).await?;
    let mut last = sent;
    for _ in 0..n {
        let msg = tokio::time::timeout(Duration::from_secs(10), heard.next())
            .await
            .context("not every listener heard the announcement")?
            .context("subscription ended")?;
        let at: i128 = std::str::from_utf8(&msg.payload)?.parse()?;
        last = last.max(at);
    }
    Ok((last - sent) / 1_000_000)
}

/// The bench's hidden command that runs a share of the fleet's agents (see [`run_agents`]).
pub const AGENTS_COMMAND: &str = "fleet-agents";

/// Runs agents `FLEETCAST_BENCH_FLEET_RANGE` (e.g. `0..250`) against the given NATS, each with
/// its own connection, folder and journal, supervising `/bin/sleep`, until stdin closes.
pub async fn run_agents() -> anyhow::Result<String> {
    let share = AgentsShare::from_env()?;
    let shutdown = CancellationToken::new();
    let handles: Vec<_> = (share.from..share.to)
        .map(|i| {
            let s = share.agent_settings(i);
            let token = shutdown.clone();
            tokio::spawn(async move { fleetcast_agent::run(s, token).await })
        })
        .collect();
    let listeners = share.start_listeners().await;
    until_stdin_closes().await;
    shutdown.cancel();
    for h in handles {
        let _ = h.await;
    }
    for l in listeners {
        l.abort();
    }
    Ok(String::new())
}

/// One agents process's share of the fleet, as the bench passed it in the environment.
struct AgentsShare {
    url: String,
    hosts: std::path::PathBuf,
    key: String,
    from: usize,
    to: usize,
    /// Closed: gen-accounts' folder (credentials, CA).
    accounts: Option<std::path::PathBuf>,
}

impl AgentsShare {
    /// From the `FLEETCAST_BENCH_FLEET_*` variables [`Fleet::start`] sets.
    fn from_env() -> anyhow::Result<AgentsShare> {
        let var = |name: &str| std::env::var(name).with_context(|| format!("{name} not set"));
        let url = var("FLEETCAST_BENCH_FLEET_NATS")?;
        let hosts = std::path::PathBuf::from(var("FLEETCAST_BENCH_FLEET_HOSTS")?);
        let key = var("FLEETCAST_BENCH_FLEET_KEY")?;
        let range = var("FLEETCAST_BENCH_FLEET_RANGE")?;
        let (from, to) = range.split_once("..").context("range is FROM..TO")?;
        let (from, to): (usize, usize) = (from.parse()?, to.parse()?);
        // Closed (FLEETCAST_BENCH_SECURE): each agent its own credentials, everything over TLS.
        let accounts = std::env::var_os("FLEETCAST_BENCH_FLEET_ACCOUNTS")
            .filter(|d| !d.is_empty())
            .map(std::path::PathBuf::from);
        Ok(AgentsShare {
            url,
            hosts,
            key,
            from,
            to,
            accounts,
        })
    }

    /// Settings for a client with `credentials` (TLS when closed).
    fn nats_as(&self, credentials: Option<std::path::PathBuf>) -> NatsSettings {
        NatsSettings {
            url: self.url.clone(),
            request_timeout: Duration::from_secs(30),
            // The benchmark's own server on 127.0.0.1, without accounts or TLS, unless closed.
            insecure_dev: self.accounts.is_none(),
            credentials,
            tls: self.accounts.as_ref().map(|dir| TlsSettings {
                ca_file: dir.join("tls/ca.pem"),
                cert_file: None,
                key_file: None,
            }),
            ..Default::default()
        }
    }

    /// Agent `i`: its own identity, folder and journal, supervising `/bin/sleep`.
    fn agent_settings(&self, i: usize) -> fleetcast_agent::Settings {
        let id = agent_id(i);
        let credentials = self
            .accounts
            .as_ref()
            .map(|dir| dir.join("creds/agents").join(format!("{id}.creds")));
        fleetcast_agent::Settings {
            nats: self.nats_as(credentials),
            data_dir: self.hosts.join(&id),
            agent_id: id,
            trusted_keys: vec![self.key.clone()],
            slot_retry: Duration::from_secs(1),
            apps: vec![fleetcast_agent::settings::AppSettings {
                name: fleetcast_events::AppName::from_static("fleet"),
                command: vec!["/bin/sleep".into(), "3600".into()],
                env: Default::default(),
                health: fleetcast_agent::health::HealthGate {
                    stay_up: Duration::ZERO,
                    ..Default::default()
                },
                crash: Default::default(),
                grace: Duration::from_secs(2),
                user: None,
                group: None,
                verify_on_start: false,
                listen: Vec::new(),
            }],
            ..Default::default()
        }
    }

    /// Starts the announcement floor's listeners, one per agent of this process.
    async fn start_listeners(&self) -> Vec<tokio::task::JoinHandle<()>> {
        // The announcement floor's listeners subscribe to a bench subject no agent may read.
        let listener_nats = self.nats_as(
            self.accounts
                .as_ref()
                .map(|dir| dir.join("creds/admin.creds")),
        );
        // The announcement floor's listeners: as many plain clients as agents here, each with its
        // own connection, saying when a message on ANNOUNCE_SUBJECT reached it.
        let mut listeners = Vec::new();
        for _ in self.from..self.to {
            let listening = async {
                let client = plain_client(&listener_nats).await?;
                let sub = client.subscribe(ANNOUNCE_SUBJECT).await?;
                // The server has the subscription before the bench publishes.
                client.flush().await?;
                Ok::<_, anyhow::Error>((client, sub))
            };
            let (client, mut sub) = match listening.await {
                Ok(listening) => listening,
                Err(e) => {
                    // The floor is then not measured; the agents still are.
                    eprintln!("an announcement listener could not start: {e:#}");
                    continue;
                }
            };
            listeners.push(tokio::spawn(async move {
                while sub.next().await.is_some() {
                    let heard = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
                    if client
                        .publish(HEARD_SUBJECT, heard.to_string().into())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }));
        }
        listeners
    }
}

/// Until the bench closes our stdin (or exits), or Ctrl-C reaches the whole process group.
async fn until_stdin_closes() {
    let mut stdin = tokio::io::stdin();
    let mut sink = Vec::new();
    tokio::select! {
        _ = tokio::io::AsyncReadExt::read_to_end(&mut stdin, &mut sink) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Until the tracker knows `n` agents.
async fn wait_known(bus: &fleetcast_cli::CliBus, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let reply = fleetcast_cli::tracker(bus, &Command::Status).await;
        if let Ok(r) = reply
            && r.agents.len() >= n
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the tracker never saw {n} agents");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn wait_completed(
    bus: &fleetcast_cli::CliBus,
    version: &str,
    n: usize,
) -> anyhow::Result<()> {
    let want = semver::Version::parse(version)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(reply) = fleetcast_cli::tracker(
            bus,
            &Command::Show {
                app: fleetcast_events::AppName::from_static("fleet"),
            },
        )
        .await
            && let Some(view) = reply.rollout
            && view.version == want
        {
            let done: usize = view.rings.iter().map(|r| r.done).sum();
            match view.phase {
                Phase::Completed if done >= n => return Ok(()),
                Phase::Halted | Phase::Aborted => {
                    bail!("rollout of {version}: {:?}", view.reason)
                }
                _ => {}
            }
        }
        if Instant::now() > deadline {
            bail!("{version} never reached {n} agents");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` clients, each with its own connection, fetching `chunks` (of the app `fleet`) by direct
/// get.
async fn floor(settings: &NatsSettings, n: usize, chunks: &[String]) -> anyhow::Result<Duration> {
    let mut clients = Vec::new();
    for _ in 0..n {
        let client = plain_client(settings).await?;
        let js = async_nats::jetstream::new(client);
        clients.push(
            js.get_stream(fleetcast_events::names::CHUNKS_STREAM)
                .await?,
        );
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for stream in clients {
        let chunks = chunks.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut bytes = 0usize;
            for id in chunks {
                bytes += stream
                    .direct_get_last_for_subject(chunk_subject("fleet", &id))
                    .await?
                    .payload
                    .len();
            }
            Ok::<_, anyhow::Error>(bytes)
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed())
}
