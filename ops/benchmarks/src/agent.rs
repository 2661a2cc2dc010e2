//! Agent benchmark: a real agent process (built with the `agent` profile, as shipped)
//! supervising the demo app, installing the ingest benchmark's ~256 MiB v1 and then updating to
//! its v2 (~1% changed) from a real store.
//!
//! - `idle_rss_mib` / `idle_cpu_ticks_60s`: the agent with its app running, doing nothing (clock
//!   ticks of user+system CPU over 60 s, 100 ticks a second; RSS at the end of that minute).
//!   `idle_rss_anon_mib` (heap, stacks) and `idle_rss_file_mib` (code and libraries) split it.
//! - `update_peak_rss_mib`: the agent's peak RSS (VmHWM) over both installs.
//! - `fetched_bytes` (v1→v2: chunks, tree nodes and the desired state with its signed
//!   manifest) vs `changed_bytes`; `full_download_bytes` (v1 from nothing, same count).
//!   `full_install_s`: v1 announced → running (download, verify, write, start, gate).
//! - `bita_fetched_bytes`: what `bita clone --seed v1.zip v2.cba` takes from the archive (its
//!   chunks plus the archive header it must read), bita's defaults; `bita_chunk_bytes` without
//!   the header.
//! - `downtime_ms`: the last `/version` answer from v1 to the first from v2, polled every
//!   millisecond by this process; `app_start_ms`: the demo app's own start (spawn → first
//!   `/health` answer), median of 5 direct starts. The target is on their difference.
//! - `switch_p99_us`: the atomic `current` switch alone, 1,000 times.
//! - `reaction_ms`: v2's desired state written (the server's timestamp) → the agent's
//!   `downloading` report (sent once it has checked the signed manifest), as shipped: what an
//!   idle host takes to act on an announcement.
//! - Small files, a second app of the same agent: ~3,000 source-like text files (~30 MiB), 11
//!   of them edited. `small_files_fetched_bytes`: everything the agent fetched for the update
//!   (chunks, tree nodes, the desired state with its signed manifest);
//!   `small_files_changed_zstd_bytes`: the edited files alone, zstd level 3 (the reference);
//!   `small_files_install_s`: v2's desired state written → v2 running (download, install,
//!   switch, health gate), and `small_files_phases_ms` when it first reported each state
//!   (`downloading` once it checked the signed manifest, …, `running`), for where that time
//!   goes; `small_files_write_hash_s`: writing, hashing and syncing just the
//!   edited files on the same disk, in this process (the reference).
//! - Rebuilt binary (`rebuilt_*`), a third app: see `rebuilt.rs`.
//! - Many files (`many_files_*`): see `many.rs`.
//! - Socket hand-over (`handover_*`, `plain_*`), two more apps: see `handover.rs`.
//! - The agent updating itself under the launcher (`agent_*`, `launcher_*`): see
//!   `selfupdate.rs`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fleetcast_agent::install::InstallRoot;
use fleetcast_agent::journal::Journal;
use fleetcast_events::SecretKey;
use fleetcast_events::v1::{AgentStatus, AppState};
use futures::StreamExt;

use crate::ingest::{
    File, MIB, fresh_store, generate_v1, ingest_once, make_v2, round, start_distributor, write_zip,
};

/// The idle minute (`FLEETCAST_BENCH_IDLE_S` shortens it for quick experiments).
fn idle() -> Duration {
    let secs = std::env::var("FLEETCAST_BENCH_IDLE_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

pub async fn run() -> anyhow::Result<String> {
    let dir = tempfile::Builder::new()
        .prefix("fleetcast-bench-agent-")
        .tempdir()?;
    eprintln!("generating packages in {}", dir.path().display());
    let bench = write_bench_packages(dir.path())?;
    let small = write_small_packages(dir.path())?;
    let rebuilt = write_rebuilt_packages(dir.path())?;
    let store = store_releases(dir.path(), &bench, &small, &rebuilt).await?;
    let bus = &store.bus;
    let mut host = BenchHost::start(dir.path(), &store).await?;

    let full = host.install_v1(bus).await?;
    let idle = host.idle_minute().await?;
    let update = host.update_polled(bus).await?;
    let small_update = host.small_files_update(bus, &small, dir.path()).await?;
    let rebuilt_update = host.rebuilt_update(bus).await?;
    let handover = host.handover_under_load(bus).await?;
    host.stop_agent();

    eprintln!("demo app start time");
    let app_start = app_start_ms(&host.demo_app, &dir.path().join("bench-app"))?;
    eprintln!("bita");
    let bita = bita_fetch(&bench.v1_zip, &bench.v2_zip, dir.path())?;

    let many = crate::many::run(dir.path()).await?;
    let selfupdate = crate::selfupdate::run(dir.path()).await?;
    let measured = Measured {
        full,
        idle,
        update,
        small: small_update,
        rebuilt: rebuilt_update,
        app_start,
        bita,
        switch_p99_us: switch_p99_us(dir.path())?,
        handover,
        many,
        selfupdate,
    };
    Ok(figures(&bench, &rebuilt, measured).to_string())
}

/// The demo app's packages: the ingest benchmark's ~256 MiB v1, and v2 with ~1% changed.
struct BenchPackages {
    v1_zip: PathBuf,
    v2_zip: PathBuf,
    /// v1's size.
    package: usize,
    /// Bytes v2 changed.
    changed: u64,
}

/// The small-files app's packages, and v2's edited files (path, content).
struct SmallPackages {
    s1_zip: PathBuf,
    s2_zip: PathBuf,
    changed_files: Vec<(String, Vec<u8>)>,
}

/// The rebuilt-binary app's packages, and the sizes zstd's references take.
struct RebuiltPackages {
    r1_zip: PathBuf,
    r2_zip: PathBuf,
    /// Build 2 as a zstd patch from build 1.
    patch_from: u64,
    /// Build 2 compressed whole.
    full: u64,
    /// Build 2 itself.
    binary: u64,
}

/// The store the agent fetches from (its server, a connection) and the key releases are
/// signed with.
struct Store {
    bus: fleetcast_cli::CliBus,
    nats: fleetcast_harness::NatsServer,
    key: SecretKey,
}

/// The agent under test: its process, its folder, its apps' ports and its reports.
struct BenchHost {
    agent: Child,
    data: PathBuf,
    statuses: async_nats::Subscriber,
    demo_app: PathBuf,
    ports: Ports,
}

/// The ports the agent's apps listen on.
struct Ports {
    bench: u16,
    small: u16,
    rebuilt: u16,
    handover: [u16; 2],
}

/// v1 from nothing: its running report, the size of its desired state, announced → running.
struct FullInstall {
    running: AgentStatus,
    desired: u64,
    install: Duration,
}

/// The idle agent: CPU ticks over the idle minute, then its memory (KiB).
struct Idle {
    ticks: u64,
    rss: u64,
    anon: u64,
    file: u64,
}

/// v1 → v2 of the demo app, polled.
struct Update {
    running: AgentStatus,
    /// Size of v2's desired state.
    desired: u64,
    /// Desired state written → the agent's `downloading` report.
    reaction: time::Duration,
    /// The last v1 answer → the first v2 answer.
    downtime: Duration,
    /// The agent's peak RSS (KiB) over both installs.
    peak_rss: u64,
}

/// The small-files update and its references.
struct SmallUpdate {
    /// v2's desired state written → v2 running.
    install: time::Duration,
    /// Everything the agent fetched for v2.
    fetched: u64,
    desired_at: time::OffsetDateTime,
    phases: Phases,
    /// The edited files, zstd level 3.
    changed_zstd: usize,
    /// Writing, hashing and syncing the edited files.
    write_hash: Duration,
}

/// The rebuilt binary's update.
struct RebuiltUpdate {
    /// Everything the agent fetched for build 2.
    fetched: u64,
    /// The agent's peak RSS (KiB) over every update so far.
    final_peak_rss: u64,
}

/// Everything `run` measured after the packages, for [`figures`].
struct Measured {
    full: FullInstall,
    idle: Idle,
    update: Update,
    small: SmallUpdate,
    rebuilt: RebuiltUpdate,
    app_start: Duration,
    bita: BitaFetch,
    switch_p99_us: u64,
    /// The `handover_*` and `plain_*` keys.
    handover: serde_json::Map<String, serde_json::Value>,
    /// The `many_files_*` keys.
    many: serde_json::Value,
    /// The `agent_*` and `launcher_*` keys.
    selfupdate: serde_json::Value,
}

/// The demo app's v1 and v2 as zips in `dir`, with a VERSION file the demo app serves.
fn write_bench_packages(dir: &Path) -> anyhow::Result<BenchPackages> {
    let mut v1 = generate_v1();
    let (mut v2, mut changed) = make_v2(&v1);
    // The demo app serves the VERSION file of the folder it runs in.
    v1.push(File::text("VERSION", "1.0.0"));
    v2.push(File::text("VERSION", "2.0.0"));
    changed += 5;
    let package: usize = v1.iter().map(|f| f.data.len()).sum();
    let (v1_zip, v2_zip) = (dir.join("bench-1.0.0.zip"), dir.join("bench-2.0.0.zip"));
    write_zip(&v1, &v1_zip)?;
    write_zip(&v2, &v2_zip)?;
    Ok(BenchPackages {
        v1_zip,
        v2_zip,
        package,
        changed,
    })
}

/// The small-files app's v1 and v2 as zips in `dir`, and v2's edited files.
fn write_small_packages(dir: &Path) -> anyhow::Result<SmallPackages> {
    let (mut s1, mut s2, edited) = small_files();
    s1.push(File::text("VERSION", "1.0.0"));
    s2.push(File::text("VERSION", "2.0.0"));
    let (s1_zip, s2_zip) = (dir.join("small-1.0.0.zip"), dir.join("small-2.0.0.zip"));
    write_zip(&s1, &s1_zip)?;
    write_zip(&s2, &s2_zip)?;
    let changed_files: Vec<(String, Vec<u8>)> = edited
        .iter()
        .map(|&i| (s2[i].path().to_string(), s2[i].data.clone()))
        .collect();
    Ok(SmallPackages {
        s1_zip,
        s2_zip,
        changed_files,
    })
}

/// The demo app built twice (see `rebuilt.rs`) as zips in `dir`, and zstd's references.
fn write_rebuilt_packages(dir: &Path) -> anyhow::Result<RebuiltPackages> {
    let (build1, build2) = crate::rebuilt::builds()?;
    let (r1_zip, r2_zip) = (dir.join("rebuilt-1.0.0.zip"), dir.join("rebuilt-2.0.0.zip"));
    for (build, zip, version) in [(&build1, &r1_zip, "1.0.0"), (&build2, &r2_zip, "2.0.0")] {
        let files = vec![
            File::bin("bin/server", std::fs::read(build)?),
            File::text("VERSION", version),
        ];
        write_zip(&files, zip)?;
    }
    Ok(RebuiltPackages {
        patch_from: crate::rebuilt::zstd_cli(Some(&build1), &build2, dir)?,
        full: crate::rebuilt::zstd_cli(None, &build2, dir)?,
        binary: std::fs::metadata(&build2)?.len(),
        r1_zip,
        r2_zip,
    })
}

/// A fresh store with every app's releases in it (and the rebuilt binary's patch listed).
async fn store_releases(
    dir: &Path,
    bench: &BenchPackages,
    small: &SmallPackages,
    rebuilt: &RebuiltPackages,
) -> anyhow::Result<Store> {
    let key = SecretKey::generate()?;
    let (nats, settings, bus) = fresh_store().await?;
    let distributor = start_distributor(&settings, &key, &dir.join("work"));
    eprintln!("storing v1 and v2");
    ingest_once(&bus, &key, &bench.v1_zip, "bench", "1.0.0").await?;
    ingest_once(&bus, &key, &bench.v2_zip, "bench", "2.0.0").await?;
    ingest_once(&bus, &key, &small.s1_zip, "small", "1.0.0").await?;
    ingest_once(&bus, &key, &small.s2_zip, "small", "2.0.0").await?;
    ingest_once(&bus, &key, &rebuilt.r1_zip, "rebuilt", "1.0.0").await?;
    ingest_once(&bus, &key, &rebuilt.r2_zip, "rebuilt", "2.0.0").await?;
    for (app, _) in crate::handover::APPS {
        for (zip, version) in crate::handover::packages(dir, app)? {
            ingest_once(&bus, &key, &zip, app, &version).await?;
        }
    }
    let r2_root = crate::ingest::tree_of(&rebuilt.r2_zip)?.1.root;
    let patches = crate::rebuilt::wait_patches(&bus, "rebuilt", "2.0.0", "1.0.0", &r2_root).await?;
    eprintln!("rebuilt: {} patch(es) listed", patches.patches.len());
    distributor.cancel();
    Ok(Store { bus, nats, key })
}

impl BenchHost {
    /// The agent, as shipped, with its five apps configured and none desired yet.
    async fn start(dir: &Path, store: &Store) -> anyhow::Result<BenchHost> {
        let demo_app = sibling_binary("fleetcast-demo-app")?;
        let ports = Ports {
            bench: fleetcast_harness::free_port()?,
            small: fleetcast_harness::free_port()?,
            rebuilt: fleetcast_harness::free_port()?,
            handover: [
                fleetcast_harness::free_port()?,
                fleetcast_harness::free_port()?,
            ],
        };
        let statuses = store
            .bus
            .client
            .subscribe(fleetcast_events::names::ALL_AGENT_STATUSES)
            .await?;
        let data = dir.join("agent");
        let config = dir.join("agent.toml");
        std::fs::write(&config, agent_config(&data, store, &demo_app, &ports))?;
        let agent = spawn_agent(&config)?;
        Ok(BenchHost {
            agent,
            data,
            statuses,
            demo_app,
            ports,
        })
    }

    /// `full_install_s`: v1 announced → running, from nothing.
    async fn install_v1(&mut self, bus: &fleetcast_cli::CliBus) -> anyhow::Result<FullInstall> {
        eprintln!("v1 from nothing");
        let install_start = Instant::now();
        desire(bus, "bench", &semver::Version::new(1, 0, 0)).await?;
        let (desired, _) = desired_entry(bus, "bench").await?;
        let (running, _) = wait_running(&mut self.statuses, "bench", "1.0.0").await?;
        let install = install_start.elapsed();
        wait_committed(&self.data.join("apps/bench"), "1.0.0").await?;
        Ok(FullInstall {
            running,
            desired,
            install,
        })
    }

    /// The agent with its app running, doing nothing for the idle minute: its CPU, then its memory.
    async fn idle_minute(&self) -> anyhow::Result<Idle> {
        eprintln!("idle for {} s", idle().as_secs());
        tokio::time::sleep(Duration::from_secs(3)).await;
        let ticks_before = cpu_ticks(self.agent.id())?;
        tokio::time::sleep(idle()).await;
        let ticks = cpu_ticks(self.agent.id())? - ticks_before;
        // Memory at the end of the idle minute: what an idle agent holds, steady.
        let rss = rss_kib(self.agent.id(), "VmRSS")?;
        let (anon, file) = (
            rss_kib(self.agent.id(), "RssAnon")?,
            rss_kib(self.agent.id(), "RssFile")?,
        );
        Ok(Idle {
            ticks,
            rss,
            anon,
            file,
        })
    }

    /// v1 → v2 with `/version` polled: the downtime, the agent's reaction and its peak RSS.
    async fn update_polled(&mut self, bus: &fleetcast_cli::CliBus) -> anyhow::Result<Update> {
        eprintln!("v1 -> v2, polling /version");
        let poller = Poller::start(self.ports.bench);
        desire(bus, "bench", &semver::Version::new(2, 0, 0)).await?;
        let (desired, desired_at) = desired_entry(bus, "bench").await?;
        let (running, phases) = wait_running(&mut self.statuses, "bench", "2.0.0").await?;
        let reacted_at = phases.first(AppState::Downloading);
        let reaction = reacted_at.context("no downloading report for 2.0.0")? - desired_at;
        wait_committed(&self.data.join("apps/bench"), "2.0.0").await?;
        let downtime = poller.finish()?;
        let peak_rss = rss_kib(self.agent.id(), "VmHWM")?;
        Ok(Update {
            running,
            desired,
            reaction,
            downtime,
            peak_rss,
        })
    }

    /// The small-files app to v1, then v2; then the references on its edited files, in `dir`.
    async fn small_files_update(
        &mut self,
        bus: &fleetcast_cli::CliBus,
        small: &SmallPackages,
        dir: &Path,
    ) -> anyhow::Result<SmallUpdate> {
        eprintln!("small files: v1, then v1 -> v2");
        let (running, desired, desired_at, phases) =
            install_then_update(bus, &mut self.statuses, &self.data, "small").await?;
        let install = running.at - desired_at;
        let fetched = running.progress_bytes.unwrap_or_default() + desired;
        let changed_zstd: usize = small
            .changed_files
            .iter()
            .map(|(_, d)| zstd::bulk::compress(d, 3).map(|c| c.len()))
            .sum::<Result<usize, _>>()?;
        let write_hash = write_hash_s(&small.changed_files, &dir.join("write-hash"))?;
        Ok(SmallUpdate {
            install,
            fetched,
            desired_at,
            phases,
            changed_zstd,
            write_hash,
        })
    }

    /// The rebuilt binary from nothing to build 1, then to build 2 (a patch).
    async fn rebuilt_update(
        &mut self,
        bus: &fleetcast_cli::CliBus,
    ) -> anyhow::Result<RebuiltUpdate> {
        eprintln!("rebuilt binary: build 1, then build 1 -> build 2");
        let (running, desired, _, _) =
            install_then_update(bus, &mut self.statuses, &self.data, "rebuilt").await?;
        Ok(RebuiltUpdate {
            fetched: running.progress_bytes.unwrap_or_default() + desired,
            final_peak_rss: rss_kib(self.agent.id(), "VmHWM")?,
        })
    }

    /// The hand-over apps' requests made and refused across an update and a rollback, by key.
    async fn handover_under_load(
        &mut self,
        bus: &fleetcast_cli::CliBus,
    ) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
        eprintln!("socket hand-over: a steady load across an update and a rollback");
        let mut handover = serde_json::Map::new();
        for ((app, _), port) in crate::handover::APPS.iter().zip(self.ports.handover) {
            let (made, failed) =
                crate::handover::under_load(bus, &mut self.statuses, &self.data, app, port).await?;
            handover.insert(format!("{app}_requests"), made.into());
            handover.insert(format!("{app}_refused_requests"), failed.into());
        }
        Ok(handover)
    }

    /// SIGTERM to the agent (it stops its apps), then waited for.
    fn stop_agent(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.agent.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.agent.wait();
    }
}

/// The agent's config: the demo app as `bench`, `small` and `rebuilt`, and the hand-over apps.
fn agent_config(data: &Path, store: &Store, demo_app: &Path, ports: &Ports) -> String {
    let Ports {
        bench,
        small,
        rebuilt,
        handover: handover_ports,
    } = *ports;
    let own = [("bench", bench), ("small", small), ("rebuilt", rebuilt)]
        .into_iter()
        .map(|(app, port)| demo_app_config(app, port, false, "", 2000, demo_app));
    let handover =
        crate::handover::APPS
            .iter()
            .zip(handover_ports)
            .map(|((app, hand_over), port)| {
                crate::handover::app_config(app, *hand_over, port, demo_app)
            });
    format!(
        "agent_id = \"bench\"\ndata_dir = \"{}\"\ntrusted_keys = [\"{}\"]\n[nats]\nurl = \"{}\"\ninsecure_dev = true\n",
        data.display(),
        store.key.public().to_text().trim(),
        store.nats.url(),
    ) + &own.chain(handover).collect::<String>()
}

/// An app of the agent's config: the demo app as `app`, serving on `port` (a socket the agent
/// holds and hands over, when `listen`), with the `env` lines (TOML) added to its environment,
/// healthy once `/health` answers within `probe_attempts` probes 5 ms apart.
pub(crate) fn demo_app_config(
    app: &str,
    port: u16,
    listen: bool,
    env: &str,
    probe_attempts: u32,
    demo_app: &Path,
) -> String {
    let listen = if listen {
        format!("listen = [\"127.0.0.1:{port}\"]\n")
    } else {
        String::new()
    };
    format!(
        "[[apps]]\nname = \"{app}\"\ncommand = [\"{}\"]\ngrace = \"5s\"\n{listen}\
         [apps.env]\nFLEETCAST_DEMO_APP_PORT = \"{port}\"\n{env}RUST_LOG = \"warn\"\n\
         [apps.health]\nstay_up = \"0s\"\nhttp = \"http://127.0.0.1:{port}/health\"\n\
         probe_interval = \"5ms\"\nprobe_attempts = {probe_attempts}\nprobe_timeout = \"1s\"\n",
        demo_app.display()
    )
}

/// The benchmark's JSON object: its keys, then the many-files, hand-over and self-update ones.
fn figures(bench: &BenchPackages, rebuilt: &RebuiltPackages, m: Measured) -> serde_json::Value {
    let (full, idle, update, small) = (&m.full, &m.idle, &m.update, &m.small);
    let mut json = serde_json::json!({
        "idle_rss_mib": round(idle.rss as f64 / 1024.0),
        "idle_rss_anon_mib": round(idle.anon as f64 / 1024.0),
        "idle_rss_file_mib": round(idle.file as f64 / 1024.0),
        "idle_cpu_ticks_60s": idle.ticks,
        "update_peak_rss_mib": round(update.peak_rss as f64 / 1024.0),
        "package_mib": round(bench.package as f64 / MIB),
        "changed_bytes": bench.changed,
        "fetched_bytes": update.running.progress_bytes.unwrap_or_default() + update.desired,
        "bita_fetched_bytes": m.bita.chunks + m.bita.header,
        "bita_chunk_bytes": m.bita.chunks,
        "full_download_bytes": full.running.progress_bytes.unwrap_or_default() + full.desired,
        "full_install_s": round(full.install.as_secs_f64()),
        "downtime_ms": round(update.downtime.as_secs_f64() * 1000.0),
        "app_start_ms": round(m.app_start.as_secs_f64() * 1000.0),
        "switch_p99_us": m.switch_p99_us,
        "reaction_ms": round(update.reaction.as_seconds_f64() * 1000.0),
        "small_files_count": SMALL_FILES,
        "small_files_fetched_bytes": small.fetched,
        "small_files_changed_zstd_bytes": small.changed_zstd,
        // Milliseconds matter here: both are a fraction of a second.
        "small_files_install_s": (small.install.as_seconds_f64() * 1000.0).round() / 1000.0,
        "small_files_phases_ms": small.phases.since_ms(small.desired_at),
        "small_files_write_hash_s": (small.write_hash.as_secs_f64() * 1000.0).round() / 1000.0,
        "rebuilt_fetched_bytes": m.rebuilt.fetched,
        "rebuilt_patch_from_bytes": rebuilt.patch_from,
        "rebuilt_full_bytes": rebuilt.full,
        "rebuilt_binary_bytes": rebuilt.binary,
        // Over every update of this run, the rebuilt binary's patch included.
        "final_peak_rss_mib": round(m.rebuilt.final_peak_rss as f64 / 1024.0),
    });
    if let (Some(all), serde_json::Value::Object(many), serde_json::Value::Object(selfupdate)) =
        (json.as_object_mut(), m.many, m.selfupdate)
    {
        all.extend(many);
        all.extend(m.handover);
        all.extend(selfupdate);
    }
    json
}

/// How many files the small-files package has.
const SMALL_FILES: usize = 3000;

/// ~3,000 source-like text files of 4–16 KiB (~30 MiB) in 300 folders, and v2 with 11 of them
/// edited (a line inserted, a function added), with the edited files' indexes.
fn small_files() -> (Vec<File>, Vec<File>, Vec<usize>) {
    let v1: Vec<File> = (0..SMALL_FILES)
        .map(|i| {
            let len = 4096 + (i * 7919) % 12_288;
            let text = crate::ingest::text(len, 10_000 + i as u64);
            let text = String::from_utf8_lossy(&text).into_owned();
            File::text(&format!("src/mod{}/file{i}.rs", i % 300), &text)
        })
        .collect();
    let edited: Vec<usize> = (0..11).map(|k| 37 + k * 271).collect();
    let mut v2 = v1.clone();
    for &i in &edited {
        let mut text = String::from_utf8_lossy(&v2[i].data).into_owned();
        let middle = text.len() / 2;
        let middle = (middle..text.len())
            .find(|&m| text.is_char_boundary(m))
            .unwrap_or(text.len());
        text.insert_str(
            middle,
            "\n    // edited in 2.0.0: handle the empty case first\n",
        );
        text.push_str("\nfn added_in_v2() -> u32 { 42 }\n");
        v2[i] = File::text(v2[i].path(), &text);
    }
    (v1, v2, edited)
}

/// The reference for installing the edited files: write each into `dir`, hash it and sync it
/// and its folder, as an installer that writes only what changed must at least do.
fn write_hash_s(files: &[(String, Vec<u8>)], dir: &Path) -> anyhow::Result<Duration> {
    std::fs::create_dir_all(dir)?;
    let start = Instant::now();
    for (i, (_, data)) in files.iter().enumerate() {
        let mut f = std::fs::File::create(dir.join(format!("f{i}")))?;
        f.write_all(data)?;
        let _ = blake3::hash(data);
        f.sync_all()?;
    }
    std::fs::File::open(dir)?.sync_all()?;
    Ok(start.elapsed())
}

/// A binary built next to this one (`ops/bench` builds them), or where `FLEETCAST_BENCH_<NAME>`
/// says (the agent is built with its own profile; bita lives in .tools).
pub(crate) fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let var = format!(
        "FLEETCAST_BENCH_{}",
        name.trim_start_matches("fleetcast-")
            .to_uppercase()
            .replace('-', "_")
    );
    let path = match std::env::var_os(&var) {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()?
            .parent()
            .context("exe folder")?
            .join(name),
    };
    if !path.is_file() {
        bail!(
            "{} not found (ops/bench builds it; or set {var})",
            path.display()
        );
    }
    Ok(path)
}

/// Size of the desired-state value the agent receives (it carries the signed manifest), and
/// when the server stored it.
/// `app` of the agent whose data folder is `data` from nothing to 1.0.0, then to 2.0.0,
/// each committed: 2.0.0's running report, the size of its desired state and when that was
/// written.
async fn install_then_update(
    bus: &fleetcast_cli::CliBus,
    statuses: &mut async_nats::Subscriber,
    data: &Path,
    app: &str,
) -> anyhow::Result<(AgentStatus, u64, time::OffsetDateTime, Phases)> {
    let journal = data.join("apps").join(app);
    desire(bus, app, &semver::Version::new(1, 0, 0)).await?;
    wait_running(statuses, app, "1.0.0").await?;
    wait_committed(&journal, "1.0.0").await?;
    desire(bus, app, &semver::Version::new(2, 0, 0)).await?;
    let (desired, desired_at) = desired_entry(bus, app).await?;
    let (running, phases) = wait_running(statuses, app, "2.0.0").await?;
    wait_committed(&journal, "2.0.0").await?;
    Ok((running, desired, desired_at, phases))
}

/// Every agent of the default ring should run `app` `version` at once (`fleetcast desire`).
pub(crate) async fn desire(
    bus: &fleetcast_cli::CliBus,
    app: &str,
    version: &semver::Version,
) -> anyhow::Result<()> {
    let app = fleetcast_events::AppName::try_from(app)?;
    let ring = fleetcast_events::RingName::from_static("default");
    fleetcast_cli::desire(bus, &app, &ring, version).await
}

pub(crate) async fn desired_entry(
    bus: &fleetcast_cli::CliBus,
    app: &str,
) -> anyhow::Result<(u64, time::OffsetDateTime)> {
    let key = fleetcast_events::names::desired_key(app, "default");
    let desired = bus.desired().await?;
    let entry = desired
        .store()
        .entry(&key)
        .await?
        .context("desired state")?;
    Ok((entry.value.len() as u64, entry.created))
}

/// One `GET path` on loopback; the body when the answer is 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    http_get_within(port, path, Duration::from_millis(500))
}

/// One `GET path` on loopback, answered within `wait`; the body when the answer is 200.
pub(crate) fn http_get_within(port: u16, path: &str, wait: Duration) -> Option<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()?;
    stream.set_read_timeout(Some(wait)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.trim().to_string())
}

/// Polls `/version` every millisecond on its own thread, keeping the answers' times.
struct Poller {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, Option<String>)>>,
}

impl Poller {
    fn start(port: u16) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                samples.push((Instant::now(), http_get(port, "/version")));
                std::thread::sleep(Duration::from_millis(1));
            }
            samples
        });
        Poller { stop, thread }
    }

    /// From the last answer of v1 to the first answer of v2.
    fn finish(self) -> anyhow::Result<Duration> {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("poller panicked"))?;
        let first_v2 = samples
            .iter()
            .find(|(_, v)| v.as_deref() == Some("2.0.0"))
            .map(|(t, _)| *t)
            .context("v2 never answered")?;
        let last_v1 = samples
            .iter()
            .filter(|(t, v)| *t < first_v2 && v.as_deref() == Some("1.0.0"))
            .map(|(t, _)| *t)
            .next_back()
            .context("v1 never answered")?;
        Ok(first_v2 - last_v1)
    }
}

/// The demo app's own start time: spawn → first `/health` answer, median of 5.
fn app_start_ms(demo_app: &Path, dir: &Path) -> anyhow::Result<Duration> {
    std::fs::create_dir_all(dir)?;
    let mut times = Vec::new();
    for _ in 0..5 {
        let port = fleetcast_harness::free_port()?;
        let start = Instant::now();
        let mut child = Command::new(demo_app)
            .current_dir(dir)
            .env("FLEETCAST_DEMO_APP_PORT", port.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?;
        let deadline = start + Duration::from_secs(30);
        while http_get(port, "/health").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("the demo app did not answer within 30 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        times.push(start.elapsed());
        let _ = child.kill();
        let _ = child.wait();
    }
    times.sort();
    Ok(times[times.len() / 2])
}

struct BitaFetch {
    /// Chunk data bita reports fetching from the archive.
    chunks: u64,
    /// The archive header (chunk dictionary) every clone reads first.
    header: u64,
}

/// `bita compress` v2, then `bita clone` it with v1 as seed; bita's defaults.
fn bita_fetch(v1: &Path, v2: &Path, dir: &Path) -> anyhow::Result<BitaFetch> {
    let bita = sibling_binary("bita")?;
    let cba = dir.join("bench-2.0.0.cba");
    let out = Command::new(&bita)
        .arg("compress")
        .arg("--input")
        .arg(v2)
        .arg(&cba)
        .output()?;
    if !out.status.success() {
        bail!("bita compress: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = Command::new(&bita)
        .arg("clone")
        .arg("--verify-output")
        .arg("--seed")
        .arg(v1)
        .arg(&cba)
        .arg(dir.join("bench-2.0.0.cloned.zip"))
        .output()?;
    let log =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("bita clone: {log}");
    }
    // "Fetched 1.6 MiB (1674182 bytes) from archive …" or "Fetched 812 bytes from archive …".
    let line = log
        .lines()
        .find(|l| l.contains("Fetched ") && l.contains(" from archive"))
        .with_context(|| format!("no fetch figure in bita's output: {log}"))?;
    let figure = line.split("Fetched ").nth(1).unwrap_or_default();
    let chunks = match figure.split_once('(') {
        Some((_, rest)) => rest.split_whitespace().next(),
        None => figure.split_whitespace().next(),
    }
    .and_then(|n| n.parse().ok())
    .with_context(|| format!("cannot read {line:?}"))?;
    // Header: 14-byte pre-header (magic, dictionary size as u64 LE at 6..14), the dictionary,
    // then 8 bytes of chunk data offset and a 64-byte checksum.
    let mut pre = [0u8; 14];
    std::fs::File::open(&cba)?.read_exact(&mut pre)?;
    let dictionary = u64::from_le_bytes(pre[6..14].try_into()?);
    Ok(BitaFetch {
        chunks,
        header: 14 + dictionary + 72,
    })
}

pub(crate) fn spawn_agent(config: &Path) -> anyhow::Result<Child> {
    let bin = sibling_binary("fleetcast-agent")?;
    Command::new(&bin)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", agent_log_filter())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (ops/bench builds it)", bin.display()))
}

/// The benched agents' log filter: warnings only, unless `FLEETCAST_BENCH_AGENT_LOG` says
/// otherwise (e.g. `info,fleetcast_agent=debug` to see where an update's time goes).
pub(crate) fn agent_log_filter() -> String {
    std::env::var("FLEETCAST_BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into())
}

pub(crate) async fn next_status(sub: &mut async_nats::Subscriber) -> anyhow::Result<AgentStatus> {
    let msg = tokio::time::timeout(Duration::from_secs(600), sub.next())
        .await?
        .context("status subscription ended")?;
    Ok(fleetcast_runtime::consume::decode_payload(
        msg.headers.as_ref(),
        &msg.payload,
    )?)
}

/// `app`'s `running` report of `version`, and when the first `downloading` one was sent.
/// When an update first reported each state, by the agent's clock (this machine's).
#[derive(Debug, Default)]
pub(crate) struct Phases(Vec<(AppState, time::OffsetDateTime)>);

impl Phases {
    pub(crate) fn first(&self, state: AppState) -> Option<time::OffsetDateTime> {
        self.0.iter().find(|(s, _)| *s == state).map(|(_, at)| *at)
    }

    /// Milliseconds from `from` to the first report of each state, by the state's name.
    fn since_ms(&self, from: time::OffsetDateTime) -> serde_json::Value {
        self.0
            .iter()
            .map(|(state, at)| {
                let ms = (*at - from).as_seconds_f64() * 1000.0;
                (
                    fleetcast_runtime::metrics::label_value(state),
                    serde_json::json!((ms * 10.0).round() / 10.0),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

pub(crate) async fn wait_running(
    sub: &mut async_nats::Subscriber,
    app: &str,
    version: &str,
) -> anyhow::Result<(AgentStatus, Phases)> {
    let mut phases = Phases::default();
    loop {
        let s = next_status(sub).await?;
        if s.app != app {
            continue;
        }
        if matches!(s.state, AppState::RolledBack | AppState::Refused) {
            bail!("{app} {version}: {:?} {:?}", s.state, s.reason);
        }
        if s.version.as_ref().is_none_or(|v| v.to_string() != version) {
            continue;
        }
        if phases.first(s.state).is_none() {
            phases.0.push((s.state, s.at));
        }
        if s.state == AppState::Running {
            return Ok((s, phases));
        }
    }
}

pub(crate) async fn wait_committed(journal: &Path, version: &str) -> anyhow::Result<()> {
    for _ in 0..6000 {
        if Journal::load(journal)
            .is_ok_and(|j| j.committed.is_some_and(|v| v.to_string() == version))
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{version} never committed")
}

pub(crate) fn rss_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .context("no such field")?;
    Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
}

pub(crate) fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of stat; after the command name, indexes 11 and 12.
    Ok(fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?)
}

fn switch_p99_us(dir: &Path) -> anyhow::Result<u64> {
    let root = InstallRoot::new(dir.join("switch"))?;
    let (a, b) = (semver::Version::new(1, 0, 0), semver::Version::new(2, 0, 0));
    std::fs::create_dir_all(root.version_dir(&a))?;
    std::fs::create_dir_all(root.version_dir(&b))?;
    let mut times: Vec<u64> = (0..1000)
        .map(|i| {
            let start = Instant::now();
            root.switch_to(if i % 2 == 0 { &a } else { &b })
                .map(|_| start.elapsed().as_micros() as u64)
        })
        .collect::<Result<_, _>>()?;
    times.sort_unstable();
    Ok(times[times.len() * 99 / 100])
}
