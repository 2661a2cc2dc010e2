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

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use fleetcast_events::SecretKey;
use fleetcast_events::names::RELEASE_STORED;
use zip::write::SimpleFileOptions;

use crate::agent::{
    desired_entry, rss_kib, sibling_binary, spawn_agent, wait_committed, wait_running,
};
use crate::ingest::{fresh_store, round, wait_stored};

const DEFAULT_COUNT: usize = 200_000;

/// `ops/bench many`: this part alone, its keys as a JSON object.
pub(crate) async fn run_alone() -> anyhow::Result<String> {
    let dir = tempfile::Builder::new()
        .prefix("fleetcast-bench-many-")
        .tempdir()?;
    Ok(run(dir.path()).await?.to_string())
}

pub(crate) async fn run(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let count = std::env::var("FLEETCAST_BENCH_MANY_FILES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_COUNT);
    let dir = dir.join("many");
    std::fs::create_dir_all(&dir)?;
    eprintln!("many files: a package of {count}");
    let zip = dir.join("many-1.0.0.zip");
    write_package(&zip, count, "1.0.0", &[])?;
    // v2: ten files edited, spread over the package.
    let edited: Vec<usize> = (0..10)
        .map(|k| k * count / 10 + 7)
        .filter(|&i| i < count)
        .collect();
    let zip2 = dir.join("many-2.0.0.zip");
    write_package(&zip2, count, "2.0.0", &edited)?;
    let zip_bytes = std::fs::metadata(&zip)?.len();

    let (nats, _settings, bus) = fresh_store().await?;
    let key = SecretKey::generate()?;
    let key_file = dir.join("signing.key");
    std::fs::write(&key_file, key.to_text())?;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
    let nats_toml = format!("[nats]\nurl = \"{}\"\ninsecure_dev = true\n", nats.url());
    let signer_toml = dir.join("signer.toml");
    std::fs::write(
        &signer_toml,
        format!(
            "key_file = \"{}\"\nknown_apps = [\"many\"]\nwork_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:0\"\n{nats_toml}",
            key_file.display(),
            dir.join("signer-work").display(),
        ),
    )?;
    let watcher_toml = dir.join("watcher.toml");
    std::fs::write(
        &watcher_toml,
        format!(
            "drop_dir = \"{}\"\nwork_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:0\"\n{nats_toml}",
            dir.join("drop").display(),
            dir.join("watcher-work").display(),
        ),
    )?;
    let distributor_toml = dir.join("distributor.toml");
    std::fs::write(
        &distributor_toml,
        format!(
            "trusted_keys = [\"{}\"]\nwork_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:0\"\n{nats_toml}",
            key.public().to_text().trim(),
            dir.join("distributor-work").display(),
        ),
    )?;
    let mut services = Services(vec![
        spawn_service("fleetcast-watcher", &watcher_toml)?,
        spawn_service("fleetcast-signer", &signer_toml)?,
        spawn_service("fleetcast-distributor", &distributor_toml)?,
    ]);

    let version = semver::Version::new(1, 0, 0);
    let mut stored = bus.client.subscribe(RELEASE_STORED).await?;
    let started = Instant::now();
    publish(&bus, &zip, &version).await?;
    let release = wait_stored(&mut stored, &version).await?;
    let ingest = started.elapsed();
    eprintln!(
        "many files: stored in {:.1} s ({} chunks, {} tree nodes)",
        ingest.as_secs_f64(),
        release.chunks,
        release.tree_nodes
    );

    let data = dir.join("agent");
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "agent_id = \"many\"\ndata_dir = \"{}\"\ntrusted_keys = [\"{}\"]\n{nats_toml}\
             [[apps]]\nname = \"many\"\ncommand = [\"sleep\", \"3600\"]\ngrace = \"1s\"\n\
             [apps.health]\nstay_up = \"0s\"\n",
            data.display(),
            key.public().to_text().trim(),
        ),
    )?;
    let mut statuses = bus
        .client
        .subscribe(fleetcast_events::names::ALL_AGENT_STATUSES)
        .await?;
    services.0.push(spawn_agent(&config)?);
    fleetcast_cli::desire(&bus, "many", "default", &version).await?;
    let (desired, desired_at) = desired_entry(&bus, "many").await?;
    let (running, _) = wait_running(&mut statuses, "many", "1.0.0").await?;
    let install = running.at - desired_at;
    wait_committed(&data.join("apps/many"), "1.0.0").await?;
    let installed = count_files(&data.join("apps/many/versions/1.0.0"))?;
    anyhow::ensure!(
        installed == count + 1,
        "{installed} files installed of {}",
        count + 1
    );
    let install_peak = round(rss_kib(services.0[3].id(), "VmHWM")? as f64 / 1024.0);

    // An update of the same size: ten files edited. The agent reads v1's tree from disk and
    // fetches only what changed.
    let v2 = semver::Version::new(2, 0, 0);
    for (name, child) in ["watcher", "signer", "distributor", "agent"]
        .iter()
        .zip(&services.0)
    {
        eprintln!(
            "many files: {name} between the releases: {} KiB resident, peak {} KiB",
            rss_kib(child.id(), "VmRSS")?,
            rss_kib(child.id(), "VmHWM")?
        );
    }
    publish(&bus, &zip2, &v2).await?;
    wait_stored(&mut stored, &v2).await?;
    fleetcast_cli::desire(&bus, "many", "default", &v2).await?;
    let (desired2, desired2_at) = desired_entry(&bus, "many").await?;
    let (updated, _) = wait_running(&mut statuses, "many", "2.0.0").await?;
    let update = updated.at - desired2_at;
    wait_committed(&data.join("apps/many"), "2.0.0").await?;
    let peak = |child: &Child| -> anyhow::Result<f64> {
        Ok(round(rss_kib(child.id(), "VmHWM")? as f64 / 1024.0))
    };
    let json = serde_json::json!({
        "many_files_count": count,
        "many_files_zip_bytes": zip_bytes,
        "many_files_ingest_s": round(ingest.as_secs_f64()),
        "many_files_install_s": round(install.as_seconds_f64()),
        "many_files_fetched_bytes": running.progress_bytes.unwrap_or_default() + desired,
        "many_files_install_peak_rss_mib": install_peak,
        "many_files_update_s": round(update.as_seconds_f64()),
        "many_files_update_fetched_bytes": updated.progress_bytes.unwrap_or_default() + desired2,
        "many_files_peak_rss_mib": {
            "watcher": peak(&services.0[0])?,
            "signer": peak(&services.0[1])?,
            "distributor": peak(&services.0[2])?,
            "agent": peak(&services.0[3])?,
        },
    });
    drop(services);
    drop(nats);
    Ok(json)
}

/// As CI does: `fleetcast publish` of `zip` as `many` `version`.
async fn publish(
    bus: &fleetcast_runtime::Bus,
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
fn write_package(path: &Path, count: usize, version: &str, edited: &[usize]) -> anyhow::Result<()> {
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(std::fs::File::create(path)?));
    let options = SimpleFileOptions::default().unix_permissions(0o644);
    for i in 0..count {
        zip.start_file(format!("src/d{:04}/f{i:06}.rs", i / 500), options)?;
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
