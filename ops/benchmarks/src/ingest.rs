//! Ingest benchmark: a generated ~256 MiB package (incompressible data, text, real ELF
//! binaries from this machine) and a v2 with ~1% of its bytes changed, pushed through a real
//! distributor on a real nats-server.
//!
//! - `ingest_mib_s`: `release.signed` published → `release.stored` received, first time: the
//!   distributor fetches the archive from the incoming store, chunks, hashes, compresses and
//!   stores every chunk, builds the release's tree, checks its root against the signed one and
//!   stores its nodes.
//! - `reingest_mib_s`: the same content again as a new version of the same app, by a freshly
//!   started distributor: the release's tree is stored already (its root, which the distributor
//!   writes last, names the same files), so the archive is not even fetched.
//! - `rechunk_mib_s`: the same content as a new app, by a freshly started distributor: every file
//!   is fetched, inflated, chunked and hashed, every chunk found already stored (asked of the
//!   store, which sends it back), nothing compressed or stored.
//! - `pipeline_mib_s`: the whole CI path for v1 on a fresh server: `fleetcast publish` (upload)
//!   → watcher → signer → distributor → `release.stored`.
//! - references: single-thread FastCDC+BLAKE3 and zstd-3 over the same uncompressed bytes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fleetcast_cli::CliBus;
use fleetcast_events::manifest::TreeRoot;
use fleetcast_events::names::{RELEASE_SIGNED, RELEASE_STORED, archive_object};
use fleetcast_events::tree::TreeFile;
use fleetcast_events::v1::{ReleaseSigned, ReleaseStored};
use fleetcast_events::{Encoding, Manifest, SecretKey, SignedManifest};
use fleetcast_harness::NatsServer;
use fleetcast_harness::fixtures::pseudo_random;
use fleetcast_package::chunking;
use fleetcast_package::{ArchiveLimits, Package};
use fleetcast_runtime::{Bus, NatsSettings};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use zip::write::SimpleFileOptions;

pub(crate) const MIB: f64 = 1024.0 * 1024.0;

#[derive(Clone)]
pub(crate) struct File {
    path: String,
    pub(crate) data: Vec<u8>,
    compressible: bool,
}

impl File {
    pub(crate) fn bin(path: &str, data: Vec<u8>) -> File {
        File {
            path: path.into(),
            data,
            compressible: false,
        }
    }

    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    pub(crate) fn text(path: &str, text: &str) -> File {
        File {
            path: path.into(),
            data: text.as_bytes().to_vec(),
            compressible: true,
        }
    }
}

pub async fn run() -> anyhow::Result<String> {
    let dir = tempfile::Builder::new()
        .prefix("fleetcast-bench-")
        .tempdir()?;
    eprintln!("generating packages in {}", dir.path().display());
    let v1 = generate_v1();
    let (v2, changed) = make_v2(&v1);
    let total: usize = v1.iter().map(|f| f.data.len()).sum();
    let v1_zip = dir.path().join("bench-1.0.0.zip");
    let v2_zip = dir.path().join("bench-2.0.0.zip");
    write_zip(&v1, &v1_zip)?;
    write_zip(&v2, &v2_zip)?;

    eprintln!("reference speeds");
    let reference_chunk_hash = reference_chunk_hash(&v1);
    let reference_compress = reference_compress(&v1);
    drop(v2);

    let key = SecretKey::generate()?;
    let (nats, settings, bus) = fresh_store().await?;
    let work = dir.path().join("work");
    let mut distributor = start_distributor(&settings, &key, &work);

    eprintln!("first ingest");
    let first = ingest_once(&bus, &key, &v1_zip, "bench", "1.0.0").await?;
    distributor.cancel();
    distributor = start_distributor(&settings, &key, &work);
    eprintln!("re-ingest as a new version, fresh distributor");
    let again = ingest_once(&bus, &key, &v1_zip, "bench", "1.0.1").await?;
    distributor.cancel();
    distributor = start_distributor(&settings, &key, &work);
    eprintln!("re-ingest as a new app, fresh distributor");
    let rechunk = ingest_once(&bus, &key, &v1_zip, "bench-copy", "1.0.0").await?;
    eprintln!("v2");
    let v2_stored = ingest_once(&bus, &key, &v2_zip, "bench", "2.0.0").await?;
    distributor.cancel();
    drop(nats);

    eprintln!("whole pipeline from fleetcast publish");
    let pipeline = whole_pipeline(&key, &v1_zip, dir.path()).await?;

    let mib = total as f64 / MIB;
    let json = serde_json::json!({
        "package_mib": round(mib),
        "zip_mib": round(std::fs::metadata(&v1_zip)?.len() as f64 / MIB),
        "ingest_mib_s": round(mib / first.0.as_secs_f64()),
        "reingest_mib_s": round(mib / again.0.as_secs_f64()),
        "rechunk_mib_s": round(mib / rechunk.0.as_secs_f64()),
        "pipeline_mib_s": round(mib / pipeline.as_secs_f64()),
        "reference_chunk_hash_mib_s": round(reference_chunk_hash),
        "reference_compress_mib_s": round(reference_compress),
        "chunks": first.1.chunks,
        "stored_mib": round(first.1.new_stored_bytes as f64 / MIB),
        "reingest_new_chunks": again.1.new_chunks + rechunk.1.new_chunks,
        "v2_changed_bytes": changed,
        "v2_stored_bytes": v2_stored.1.new_stored_bytes,
        "v2_new_chunks": v2_stored.1.new_chunks,
    });
    Ok(json.to_string())
}

/// A nats-server of its own and a connection to it with every stream and bucket.
pub(crate) async fn fresh_store() -> anyhow::Result<(NatsServer, NatsSettings, CliBus)> {
    fresh_store_with(Default::default()).await
}

/// A fresh store whose streams this connection creates with `quotas`.
pub(crate) async fn fresh_store_with(
    quotas: fleetcast_runtime::settings::StoreQuotas,
) -> anyhow::Result<(NatsServer, NatsSettings, CliBus)> {
    let nats = NatsServer::start().await?;
    let settings = NatsSettings {
        quotas,
        url: nats.url(),
        request_timeout: Duration::from_secs(30),
        // A server of the benchmark's own on 127.0.0.1, without accounts or TLS.
        insecure_dev: true,
        ..Default::default()
    };
    let bus = Bus::connect(&settings, "bench", &CancellationToken::new()).await?;
    let bus = CliBus::on(bus, &settings.url, settings.request_timeout);
    Ok((nats, settings, bus))
}

pub(crate) fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub(crate) fn start_distributor(
    settings: &NatsSettings,
    key: &SecretKey,
    work: &Path,
) -> CancellationToken {
    let token = CancellationToken::new();
    let s = fleetcast_distributor::Settings {
        nats: settings.clone(),
        trusted_keys: vec![key.public().to_text()],
        work_dir: Some(work.to_path_buf()),
        ..Default::default()
    };
    let t = token.clone();
    tokio::spawn(async move {
        if let Err(e) = fleetcast_distributor::run(s, t).await {
            eprintln!("distributor failed: {e}");
        }
    });
    token
}

/// Uploads and signs (untimed, as the signer would), then times signed → stored.
pub(crate) async fn ingest_once(
    bus: &CliBus,
    key: &SecretKey,
    zip: &Path,
    app: &str,
    version: &str,
) -> anyhow::Result<(Duration, ReleaseStored)> {
    let version = semver::Version::parse(version)?;
    let path = zip.to_path_buf();
    let (_, tree) = tokio::task::spawn_blocking(move || tree_of(&path)).await??;
    let blake3 = {
        let mut h = blake3::Hasher::new();
        h.update_reader(std::fs::File::open(zip)?)?;
        h.finalize().to_hex().to_string()
    };
    let object = archive_object(app, &version, &blake3);
    let mut file = tokio::fs::File::open(zip).await?;
    bus.incoming()
        .await?
        .upload_archive(&object, &mut file)
        .await?;
    let now = time::OffsetDateTime::now_utc();
    let manifest = Manifest {
        rollback_from: None,
        app: fleetcast_events::AppName::try_from(app)?,
        version: version.clone(),
        tree,
        created: now,
        expires: now + time::Duration::days(1),
    };
    let signed = ReleaseSigned {
        app: fleetcast_events::AppName::try_from(app)?,
        version: version.clone(),
        object,
        blake3,
        manifest: SignedManifest::sign(&manifest, &[key])?,
    };
    let mut stored_events = bus.client.subscribe(RELEASE_STORED).await?;
    let start = Instant::now();
    bus.publish_event(RELEASE_SIGNED, &signed, Encoding::MsgPack, None)
        .await?;
    let stored = wait_stored(&mut stored_events, &version).await?;
    Ok((start.elapsed(), stored))
}

/// A package's files and the root of their tree, as the signer computes them.
pub(crate) fn tree_of(zip: &Path) -> anyhow::Result<(Vec<TreeFile>, TreeRoot)> {
    let files = Package::open(zip, &ArchiveLimits::default())?.file_tree()?;
    let built = fleetcast_events::tree::build(&files)?;
    let root = TreeRoot::of(&built, &files);
    Ok((files, root))
}

pub(crate) async fn wait_stored(
    sub: &mut async_nats::Subscriber,
    version: &semver::Version,
) -> anyhow::Result<ReleaseStored> {
    let deadline = tokio::time::sleep(Duration::from_secs(600));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => bail!("release {version} not stored within 10 minutes"),
            msg = sub.next() => {
                let msg = msg.context("subscription ended")?;
                let stored: ReleaseStored =
                    fleetcast_runtime::consume::decode_payload(msg.headers.as_ref(), &msg.payload)?;
                if stored.version == *version {
                    return Ok(stored);
                }
            }
        }
    }
}

/// The CI path on a fresh server: publish → watcher → signer → distributor.
async fn whole_pipeline(key: &SecretKey, zip: &Path, dir: &Path) -> anyhow::Result<Duration> {
    let nats = NatsServer::start().await?;
    let settings = NatsSettings {
        url: nats.url(),
        request_timeout: Duration::from_secs(30),
        // A server of the benchmark's own on 127.0.0.1, without accounts or TLS.
        insecure_dev: true,
        ..Default::default()
    };
    let key_file = dir.join("signing.key");
    std::fs::write(&key_file, key.to_text())?;
    // The signer refuses a key others can read.
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    let cancel = CancellationToken::new();
    let work = dir.join("work2");
    let w = fleetcast_watcher::Settings {
        nats: settings.clone(),
        drop_dir: dir.join("drop"),
        work_dir: Some(work.clone()),
        ..Default::default()
    };
    let s = fleetcast_signer::Settings {
        nats: settings.clone(),
        key_file,
        work_dir: Some(work.clone()),
        ..Default::default()
    };
    let (c1, c2) = (cancel.clone(), cancel.clone());
    tokio::spawn(async move {
        fleetcast_watcher::run(w, c1)
            .await
            .map_err(|e| eprintln!("watcher: {e}"))
    });
    tokio::spawn(async move {
        fleetcast_signer::run(s, c2)
            .await
            .map_err(|e| eprintln!("signer: {e}"))
    });
    let distributor = start_distributor(&settings, key, &work);
    let bus = Bus::connect(&settings, "bench", &cancel).await?;
    let bus = CliBus::on(bus, &settings.url, settings.request_timeout);
    let version = semver::Version::new(1, 0, 0);
    let mut stored_events = bus.client.subscribe(RELEASE_STORED).await?;
    let start = Instant::now();
    let request = fleetcast_cli::PublishRequest {
        archive: zip,
        app: None,
        version: None,
        published_by: None,
        progress: None,
    };
    fleetcast_cli::publish(&bus, request).await?;
    wait_stored(&mut stored_events, &version).await?;
    let elapsed = start.elapsed();
    cancel.cancel();
    distributor.cancel();
    Ok(elapsed)
}

fn reference_chunk_hash(files: &[File]) -> f64 {
    let total: usize = files.iter().map(|f| f.data.len()).sum();
    let start = Instant::now();
    let mut n = 0usize;
    for f in files {
        for c in fastcdc::v2020::FastCDC::new(
            &f.data,
            chunking::MIN_CHUNK,
            chunking::AVG_CHUNK,
            chunking::MAX_CHUNK,
        ) {
            n += blake3::hash(&f.data[c.offset..c.offset + c.length]).as_bytes()[0] as usize;
        }
    }
    std::hint::black_box(n);
    total as f64 / MIB / start.elapsed().as_secs_f64()
}

fn reference_compress(files: &[File]) -> f64 {
    let total: usize = files.iter().map(|f| f.data.len()).sum();
    let start = Instant::now();
    let mut out = 0usize;
    for f in files {
        for part in f.data.chunks(chunking::AVG_CHUNK) {
            out += zstd::bulk::compress(part, chunking::ZSTD_LEVEL)
                .map(|c| c.len())
                .unwrap_or(0);
        }
    }
    std::hint::black_box(out);
    total as f64 / MIB / start.elapsed().as_secs_f64()
}

/// ~96 MiB incompressible, ~64 MiB text, ~96 MiB of this machine's ELF binaries.
pub(crate) fn generate_v1() -> Vec<File> {
    let mut files = Vec::new();
    for i in 0..4 {
        files.push(File {
            path: format!("assets/blob{i}.bin"),
            data: pseudo_random(24 << 20, 100 + i),
            compressible: false,
        });
    }
    for i in 0..8 {
        files.push(File {
            path: format!("share/log{i}.txt"),
            data: text(8 << 20, i),
            compressible: true,
        });
    }
    let mut elf_total = 0usize;
    for path in elf_files() {
        if elf_total >= 96 << 20 {
            break;
        }
        if let Ok(data) = std::fs::read(&path) {
            elf_total += data.len();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            files.push(File {
                path: format!("lib/{name}"),
                data,
                compressible: true,
            });
        }
    }
    if elf_total < 96 << 20 {
        // A machine with few binaries: make up the mix with more text.
        files.push(File {
            path: "share/filler.txt".into(),
            data: text((96 << 20) - elf_total, 99),
            compressible: true,
        });
    }
    files
}

fn elf_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/bin",
    ] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if !meta.is_file() || meta.len() < 256 << 10 || meta.len() > 24 << 20 {
                continue;
            }
            let mut magic = [0u8; 4];
            if std::fs::File::open(&p)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
                .is_ok()
                && magic == *b"\x7fELF"
            {
                out.push(p);
            }
        }
    }
    out
}

pub(crate) fn text(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "request",
        "served",
        "latency",
        "ms",
        "status",
        "200",
        "collector",
        "metric",
        "host",
        "cpu",
        "disk",
        "ok",
        "warn",
        "retry",
        "upstream",
        "bytes",
    ];
    let noise = pseudo_random(len / 4 + 64, seed);
    let mut out = Vec::with_capacity(len + 128);
    let mut i = 0;
    while out.len() < len {
        let r = noise[i % noise.len()] as usize;
        let _ = writeln!(
            out,
            "2026-11-{:02}T{:02}:{:02} {} {} {}",
            r % 28 + 1,
            r % 24,
            i % 60,
            WORDS[r % 16],
            WORDS[(r / 16) % 16],
            i * 7 + r
        );
        i += 1;
    }
    out.truncate(len);
    out
}

/// v2: an in-place patch, an insertion in the middle of a large file, a rewritten file and a new
/// file, all random bytes; about 1% of the package. Returns the files and the changed bytes.
pub(crate) fn make_v2(v1: &[File]) -> (Vec<File>, u64) {
    let mut v2: Vec<File> = v1
        .iter()
        .map(|f| File {
            path: f.path.clone(),
            data: f.data.clone(),
            compressible: f.compressible,
        })
        .collect();
    let mut changed = 0u64;
    // In-place patch of 512 KiB in a text file.
    let patch = pseudo_random(512 << 10, 7001);
    v2[4].data[3 << 20..(3 << 20) + patch.len()].copy_from_slice(&patch);
    changed += patch.len() as u64;
    // Insertion of 512 KiB in the middle of a large incompressible file.
    let insert = pseudo_random(512 << 10, 7002);
    let mid = v2[0].data.len() / 2;
    v2[0].data.splice(mid..mid, insert.iter().copied());
    changed += insert.len() as u64;
    // A rewritten file: the last binary replaced by random bytes of the same size (≤ 1 MiB).
    let idx = v2
        .iter()
        .rposition(|f| f.path.starts_with("lib/") && f.data.len() <= 1 << 20)
        .unwrap_or(v2.len() - 1);
    let len = v2[idx].data.len();
    v2[idx].data = pseudo_random(len, 7003);
    changed += len as u64;
    // A new file.
    v2.push(File {
        path: "share/new.bin".into(),
        data: pseudo_random(768 << 10, 7004),
        compressible: false,
    });
    changed += 768 << 10;
    (v2, changed)
}

pub(crate) fn write_zip(files: &[File], path: &Path) -> anyhow::Result<()> {
    let mut w = zip::ZipWriter::new(std::io::BufWriter::new(std::fs::File::create(path)?));
    for f in files {
        let method = if f.compressible {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        };
        // Programs are executable, as a release's `bin/` holds them.
        let mode = if f.path.starts_with("bin/") {
            0o755
        } else {
            0o644
        };
        let opts = SimpleFileOptions::default()
            .compression_method(method)
            .unix_permissions(mode);
        w.start_file(f.path.as_str(), opts)?;
        w.write_all(&f.data)?;
    }
    w.finish()?.flush()?;
    Ok(())
}
