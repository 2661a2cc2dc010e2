//! Many files, part of `ops/bench agent`: a package of 200,000 small files (set
//! `FLEETCAST_BENCH_MANY_FILES` to try another count) through the real pipeline, each part its
//! own process as shipped: `fleetcast publish` (this process, as CI) → watcher → signer →
//! distributor → an agent installing it from nothing.
//!
//! - `many_files_count`: files in the package.
//! - `many_files_ingest_s`: published → `release.stored` (the signer hashes, chunks and builds
//!   the tree, the distributor builds it again, stores every chunk and node).
//! - `many_files_install_s`: desired state written → the agent reports the version running.
//! - `many_files_update_s` / `many_files_update_fetched_bytes`: then v2, ten files edited:
//!   desired → running, and everything the agent fetched for it.
//! - `many_files_peak_rss_mib`: the peak RSS (VmHWM) of the watcher, the signer, the
//!   distributor and the agent over the whole run, both versions (the goal: at most 256 MiB
//!   each); `many_files_install_peak_rss_mib`: the agent's after the first install alone.
//! - `many_files_fetched_bytes` against `many_files_zip_bytes`: what the agent took from the
//!   store (chunks, tree nodes, the announcement) against the archive CI uploaded.
//!
//! `ops/bench huge` runs the same path with one large package instead (`huge_*` keys, no
//! update): 1,024 text-like files of 10 MiB, 10 GiB in all, with the store's quotas raised to
//! hold it (`nats.quotas`).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use fleetcast_events::SecretKey;
use fleetcast_events::names::RELEASE_STORED;
use fleetcast_harness::NatsServer;
use zip::write::SimpleFileOptions;

use crate::agent::{
    desired_entry, rss_kib, sibling_binary, spawn_agent, wait_committed, wait_running,
};
use crate::ingest::{fresh_store_with, round, wait_stored};

const DEFAULT_COUNT: usize = 200_000;

/// What package goes through: many small files and an update, or a few large ones.
#[derive(Clone, Copy)]
struct Shape {
    /// Prefix of the JSON keys.
    name: &'static str,
    count: usize,
    /// Each file's size; `None`: small source-like files of ~100–600 bytes.
    file_bytes: Option<usize>,
    /// Then v2 with ten files edited.
    update: bool,
}

/// `ops/bench many`: this part alone, its keys as a JSON object.
pub(crate) async fn run_alone() -> anyhow::Result<String> {
    let dir = tempfile::Builder::new()
        .prefix("fleetcast-bench-many-")
        .tempdir()?;
    Ok(run(dir.path()).await?.to_string())
}

/// `ops/bench huge`: 10 GiB in 1,024 files.
pub(crate) async fn run_huge() -> anyhow::Result<String> {
    let dir = tempfile::Builder::new()
        .prefix("fleetcast-bench-huge-")
        .tempdir()?;
    let shape = Shape {
        name: "huge",
        count: 1024,
        file_bytes: Some(10 << 20),
        update: false,
    };
    Ok(run_shape(dir.path(), shape).await?.to_string())
}

pub(crate) async fn run(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let count = std::env::var("FLEETCAST_BENCH_MANY_FILES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_COUNT);
    let shape = Shape {
        name: "many_files",
        count,
        file_bytes: None,
        update: true,
    };
    run_shape(dir, shape).await
}

async fn run_shape(dir: &Path, shape: Shape) -> anyhow::Result<serde_json::Value> {
    let Shape { name, count, .. } = shape;
    let dir = dir.join("many");
    std::fs::create_dir_all(&dir)?;
    eprintln!("{name}: a package of {count} files");
    let packages = write_versions(&dir, shape)?;
    let mut pipeline = Pipeline::start(&dir, shape, packages.zip_bytes).await?;
    let ingest = pipeline.ingest_v1(name, &packages.zip).await?;
    let (mut agent, install) = pipeline.install_v1(&dir, count).await?;

    pipeline.log_rss(name)?;
    // An update of the same size: ten files edited. The agent reads v1's tree from disk and
    // fetches only what changed.
    let update = if shape.update {
        Some(pipeline.update_v2(&mut agent, &packages.zip2).await?)
    } else {
        None
    };
    let measured = Measured {
        zip_bytes: packages.zip_bytes,
        ingest,
        install,
        update,
        peak_rss_mib: pipeline.peak_rss_mib()?,
    };
    let json = figures(shape, &measured);
    // The services stopped, then the server, before the connection closes.
    drop(pipeline.services);
    drop(pipeline.nats);
    Ok(json)
}

/// v1 and v2 (written only when `shape.update`) of the package.
struct Packages {
    zip: PathBuf,
    zip2: PathBuf,
    /// v1's archive.
    zip_bytes: u64,
}

/// This part's pipeline: a server of its own, the services as shipped (and the agent, once
/// started), a connection and the signing key.
struct Pipeline {
    /// Every `release.stored`, from before v1 is published.
    stored: async_nats::Subscriber,
    /// Watcher, signer, distributor, then the agent.
    services: Services,
    bus: fleetcast_cli::CliBus,
    nats: NatsServer,
    key: SecretKey,
    /// The `[nats]` section of every program's config.
    nats_toml: String,
}

/// The agent's reports and its folder.
struct ManyAgent {
    statuses: async_nats::Subscriber,
    data: PathBuf,
}

/// v1 from nothing on the agent.
struct Install {
    /// Desired state written → running.
    install: time::Duration,
    /// Everything the agent fetched.
    fetched: u64,
    /// The agent's peak RSS (MiB) after it.
    peak_rss_mib: f64,
}

/// The update to v2.
struct Update {
    /// Desired state written → running.
    update: time::Duration,
    /// Everything the agent fetched.
    fetched: u64,
}

/// What this part measured, for [`figures`].
struct Measured {
    zip_bytes: u64,
    /// Published → stored.
    ingest: Duration,
    install: Install,
    update: Option<Update>,
    /// Watcher, signer, distributor, agent.
    peak_rss_mib: [f64; 4],
}

/// The package's versions as zips in `dir`: v1, and v2 with ten files edited.
fn write_versions(dir: &Path, shape: Shape) -> anyhow::Result<Packages> {
    let count = shape.count;
    let zip = dir.join("many-1.0.0.zip");
    write_package(&zip, count, shape.file_bytes, "1.0.0", &[])?;
    // v2: ten files edited, spread over the package.
    let edited: Vec<usize> = (0..10)
        .map(|k| k * count / 10 + 7)
        .filter(|&i| i < count)
        .collect();
    let zip2 = dir.join("many-2.0.0.zip");
    if shape.update {
        write_package(&zip2, count, shape.file_bytes, "2.0.0", &edited)?;
    }
    let zip_bytes = std::fs::metadata(&zip)?.len();
    Ok(Packages {
        zip,
        zip2,
        zip_bytes,
    })
}

/// The store's quotas: the defaults, or room for large files' archive and chunks.
fn store_quotas(shape: Shape, zip_bytes: u64) -> fleetcast_runtime::settings::StoreQuotas {
    // Room in the store for the archive and its chunks, whatever their size.
    if shape.file_bytes.is_some() {
        let room = (zip_bytes as i64 + (1 << 30)).max(2 << 30);
        fleetcast_runtime::settings::StoreQuotas {
            incoming_bytes: room,
            chunks_bytes: 2 * room,
            ..Default::default()
        }
    } else {
        Default::default()
    }
}

impl Pipeline {
    /// A fresh store, a signing key, and the watcher, signer and distributor running.
    async fn start(dir: &Path, shape: Shape, zip_bytes: u64) -> anyhow::Result<Pipeline> {
        let quotas = store_quotas(shape, zip_bytes);
        let (nats, _settings, bus) = fresh_store_with(quotas.clone()).await?;
        let key = SecretKey::generate()?;
        let key_file = dir.join("signing.key");
        std::fs::write(&key_file, key.to_text())?;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
        let nats_toml = format!(
            "[nats]\nurl = \"{}\"\ninsecure_dev = true\n[nats.quotas]\nincoming_bytes = {}\nchunks_bytes = {}\n",
            nats.url(),
            quotas.incoming_bytes,
            quotas.chunks_bytes
        );
        let services = spawn_pipeline(dir, &key, &key_file, &nats_toml)?;
        let stored = bus.client.subscribe(RELEASE_STORED).await?;
        Ok(Pipeline {
            stored,
            services,
            bus,
            nats,
            key,
            nats_toml,
        })
    }

    /// `ingest_s`: v1 published → stored.
    async fn ingest_v1(&mut self, name: &str, zip: &Path) -> anyhow::Result<Duration> {
        let version = semver::Version::new(1, 0, 0);
        let started = Instant::now();
        publish(&self.bus, zip, &version).await?;
        let release = wait_stored(&mut self.stored, &version).await?;
        let ingest = started.elapsed();
        eprintln!(
            "{name}: stored in {:.1} s ({} chunks, {} tree nodes)",
            ingest.as_secs_f64(),
            release.chunks,
            release.tree_nodes
        );
        Ok(ingest)
    }

    /// The agent started, then v1 from nothing: desired → running, every file installed.
    async fn install_v1(
        &mut self,
        dir: &Path,
        count: usize,
    ) -> anyhow::Result<(ManyAgent, Install)> {
        let data = dir.join("agent");
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "agent_id = \"many\"\ndata_dir = \"{}\"\ntrusted_keys = [\"{}\"]\n{}\
                 [[apps]]\nname = \"many\"\ncommand = [\"sleep\", \"3600\"]\ngrace = \"1s\"\n\
                 [apps.health]\nstay_up = \"0s\"\n",
                data.display(),
                self.key.public().to_text().trim(),
                self.nats_toml,
            ),
        )?;
        let mut statuses = self
            .bus
            .client
            .subscribe(fleetcast_events::names::ALL_AGENT_STATUSES)
            .await?;
        self.services.0.push(spawn_agent(&config)?);
        let version = semver::Version::new(1, 0, 0);
        crate::agent::desire(&self.bus, "many", &version).await?;
        let (desired, desired_at) = desired_entry(&self.bus, "many").await?;
        let (running, _) = wait_running(&mut statuses, "many", "1.0.0").await?;
        let install = running.at - desired_at;
        wait_committed(&data.join("apps/many"), "1.0.0").await?;
        let installed = count_files(&data.join("apps/many/versions/1.0.0"))?;
        anyhow::ensure!(
            installed == count + 1,
            "{installed} files installed of {}",
            count + 1
        );
        let install = Install {
            install,
            fetched: running.progress_bytes.unwrap_or_default() + desired,
            peak_rss_mib: round(rss_kib(self.services.0[3].id(), "VmHWM")? as f64 / 1024.0),
        };
        Ok((ManyAgent { statuses, data }, install))
    }

    /// Each process's resident and peak memory after the first release, on stderr.
    fn log_rss(&self, name: &str) -> anyhow::Result<()> {
        for (service, child) in ["watcher", "signer", "distributor", "agent"]
            .iter()
            .zip(&self.services.0)
        {
            eprintln!(
                "{name}: {service} after the first release: {} KiB resident, peak {} KiB",
                rss_kib(child.id(), "VmRSS")?,
                rss_kib(child.id(), "VmHWM")?
            );
        }
        Ok(())
    }

    /// v2 published and stored, then desired → running on the agent.
    async fn update_v2(&mut self, agent: &mut ManyAgent, zip2: &Path) -> anyhow::Result<Update> {
        let v2 = semver::Version::new(2, 0, 0);
        publish(&self.bus, zip2, &v2).await?;
        wait_stored(&mut self.stored, &v2).await?;
        crate::agent::desire(&self.bus, "many", &v2).await?;
        let (desired2, desired2_at) = desired_entry(&self.bus, "many").await?;
        let (updated, _) = wait_running(&mut agent.statuses, "many", "2.0.0").await?;
        let update = updated.at - desired2_at;
        wait_committed(&agent.data.join("apps/many"), "2.0.0").await?;
        Ok(Update {
            update,
            fetched: updated.progress_bytes.unwrap_or_default() + desired2,
        })
    }

    /// The peak RSS (MiB) of the watcher, the signer, the distributor and the agent.
    fn peak_rss_mib(&self) -> anyhow::Result<[f64; 4]> {
        let peak = |child: &Child| -> anyhow::Result<f64> {
            Ok(round(rss_kib(child.id(), "VmHWM")? as f64 / 1024.0))
        };
        Ok([
            peak(&self.services.0[0])?,
            peak(&self.services.0[1])?,
            peak(&self.services.0[2])?,
            peak(&self.services.0[3])?,
        ])
    }
}

/// Starts the watcher, the signer (`key_file`) and the distributor (trusting `key`), as shipped.
fn spawn_pipeline(
    dir: &Path,
    key: &SecretKey,
    key_file: &Path,
    nats_toml: &str,
) -> anyhow::Result<Services> {
    // Each service's own settings; then what all three take alike: a work folder of its own,
    // metrics on a free port, the NATS connection.
    let own = [
        (
            "watcher",
            format!("drop_dir = \"{}\"\n", dir.join("drop").display()),
        ),
        (
            "signer",
            format!(
                "key_file = \"{}\"\nknown_apps = [\"many\"]\n",
                key_file.display()
            ),
        ),
        (
            "distributor",
            format!("trusted_keys = [\"{}\"]\n", key.public().to_text().trim()),
        ),
    ];
    let mut services = Vec::new();
    for (name, settings) in own {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "{settings}work_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:0\"\n{nats_toml}",
                dir.join(format!("{name}-work")).display(),
            ),
        )?;
        services.push(spawn_service(&format!("fleetcast-{name}"), &config)?);
    }
    Ok(Services(services))
}

/// This part's JSON object, every key under the shape's name.
fn figures(shape: Shape, m: &Measured) -> serde_json::Value {
    let Shape { name, count, .. } = shape;
    let mut json = serde_json::json!({
        "count": count,
        "zip_bytes": m.zip_bytes,
        "ingest_s": round(m.ingest.as_secs_f64()),
        "install_s": round(m.install.install.as_seconds_f64()),
        "fetched_bytes": m.install.fetched,
        "install_peak_rss_mib": m.install.peak_rss_mib,
    });
    if let Some(bytes) = shape.file_bytes {
        json["total_bytes"] = serde_json::json!(bytes as u64 * count as u64);
    }
    if let Some(update) = &m.update {
        json["update_s"] = serde_json::json!(round(update.update.as_seconds_f64()));
        json["update_fetched_bytes"] = serde_json::json!(update.fetched);
    }
    let [watcher, signer, distributor, agent] = m.peak_rss_mib;
    json["peak_rss_mib"] = serde_json::json!({
        "watcher": watcher,
        "signer": signer,
        "distributor": distributor,
        "agent": agent,
    });
    // Every key under the shape's name, as `ops/bench agent` prints them.
    let json: serde_json::Map<String, serde_json::Value> = json
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (format!("{name}_{k}"), v.clone()))
        .collect();
    serde_json::Value::Object(json)
}

/// As CI does: `fleetcast publish` of `zip` as `many` `version`.
async fn publish(
    bus: &fleetcast_cli::CliBus,
    zip: &Path,
    version: &semver::Version,
) -> anyhow::Result<()> {
    let request = fleetcast_cli::PublishRequest {
        archive: zip,
        app: Some("many".into()),
        version: Some(version.clone()),
        published_by: None,
        progress: None,
    };
    fleetcast_cli::publish(bus, request).await?;
    Ok(())
}

/// `count` source-like text files of ~100–600 bytes in folders of 500, and a VERSION file;
/// the files at `edited` have one more line.
fn write_package(
    path: &Path,
    count: usize,
    file_bytes: Option<usize>,
    version: &str,
    edited: &[usize],
) -> anyhow::Result<()> {
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(std::fs::File::create(path)?));
    // Large files at deflate's fastest level: writing 10 GiB at its default takes minutes.
    let options = SimpleFileOptions::default()
        .unix_permissions(0o644)
        .compression_level(file_bytes.map(|_| 1))
        .large_file(file_bytes.is_some_and(|b| b as u64 >= u32::MAX as u64));
    for i in 0..count {
        zip.start_file(format!("src/d{:04}/f{i:06}.rs", i / 500), options)?;
        if let Some(bytes) = file_bytes {
            // Text-like and unique throughout (no chunk repeats), compressible a few times.
            let mut written = 0;
            let mut l = 0u64;
            while written < bytes {
                let line = format!(
                    "pub fn item_{i}_{l}() -> u64 {{ {} }}\n",
                    l * 2_654_435_761 % 1_000_003
                );
                let take = line.len().min(bytes - written);
                zip.write_all(&line.as_bytes()[..take])?;
                written += take;
                l += 1;
            }
            continue;
        }
        let lines = 2 + i % 12;
        for l in 0..lines {
            writeln!(zip, "pub fn item_{i}_{l}() -> u64 {{ {} }}", i * 31 + l)?;
        }
        if edited.contains(&i) {
            writeln!(zip, "// edited in {version}")?;
        }
    }
    zip.start_file("VERSION", options)?;
    zip.write_all(version.as_bytes())?;
    zip.finish()?.flush()?;
    Ok(())
}

fn count_files(dir: &Path) -> anyhow::Result<usize> {
    let mut n = 0;
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                folders.push(entry.path());
            } else {
                n += 1;
            }
        }
    }
    Ok(n)
}

/// A service as shipped (its own binary, a config file), its log beside the config.
fn spawn_service(name: &str, config: &Path) -> anyhow::Result<Child> {
    let bin = sibling_binary(name)?;
    let log = std::fs::File::create(config.with_extension("log"))?;
    Command::new(&bin)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {} (ops/bench builds it)", bin.display()))
}

/// The processes of this part, stopped (SIGTERM, then waited for) when it ends, however.
struct Services(Vec<Child>);

impl Drop for Services {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }
}
