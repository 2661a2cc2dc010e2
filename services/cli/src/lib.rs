//! The `fleetcast` operator command's actions, as a library so end-to-end tests drive exactly
//! what CI runs.

pub mod root;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use fleetcast_events::names::{self, RELEASE_PUBLISHED};
use fleetcast_events::v1::{ReleasePublished, ReleaseRecord, ReleaseState};
use fleetcast_events::{Encoding, SecretKey};
use fleetcast_package::{ArchiveLimits, Package, parse_package_file_name};
use fleetcast_runtime::{Bus, NatsSettings};
use fleetcast_tracker::api::{Command, Reply, RolloutView};
use fleetcast_tracker::rollout::Phase;
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use semver::Version;
use tokio_util::sync::CancellationToken;

/// Connects and ensures the streams and stores exist, or fails after `timeout` with a message
/// that says where it tried.
pub async fn connect(settings: &NatsSettings, timeout: Duration) -> anyhow::Result<Bus> {
    let cancel = CancellationToken::new();
    let guard = cancel.clone();
    let timer = tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        guard.cancel();
    });
    let bus = Bus::attach(settings, "fleetcast-cli", &cancel).await;
    timer.abort();
    bus.with_context(|| format!("cannot reach NATS at {} within {timeout:?}", settings.url))
}

/// Writes `<dir>/<name>.key` (secret, mode 0600) and `<dir>/<name>.pub`.
pub fn keygen(dir: &Path, name: &str, force: bool) -> anyhow::Result<(PathBuf, PathBuf, String)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let secret_path = dir.join(format!("{name}.key"));
    let public_path = dir.join(format!("{name}.pub"));
    if !force && (secret_path.exists() || public_path.exists()) {
        bail!(
            "{} or {} already exists (use --force to replace)",
            secret_path.display(),
            public_path.display()
        );
    }
    let key = SecretKey::generate()?;
    write_private(&secret_path, key.to_text().as_bytes())?;
    std::fs::write(&public_path, key.public().to_text())
        .with_context(|| format!("writing {}", public_path.display()))?;
    Ok((secret_path, public_path, key.public().id()))
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

pub struct PublishRequest<'a> {
    pub archive: &'a Path,
    pub app: Option<String>,
    pub version: Option<Version>,
    pub published_by: Option<String>,
    /// Called with (bytes uploaded so far, total) during the upload.
    pub progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
}

/// An archive checked locally and named: what `publish` uploads.
pub struct PreparedRelease {
    pub archive: PathBuf,
    pub app: String,
    pub version: Version,
    pub size: u64,
    pub blake3: String,
}

/// Checks the archive locally with the same rules the watcher applies (so CI fails early, even
/// without NATS) and works out its app, version and hash.
pub async fn prepare_release(
    archive: &Path,
    app: Option<String>,
    version: Option<Version>,
) -> anyhow::Result<PreparedRelease> {
    let file_name = archive
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let (app, version) = match (app, version) {
        (Some(app), Some(version)) => (app, version),
        (app, version) => {
            let parsed = parse_package_file_name(file_name)
                .map_err(|e| anyhow::anyhow!("{e}; or give --app and --version"))?;
            (app.unwrap_or(parsed.app), version.unwrap_or(parsed.version))
        }
    };
    names::validate_app_name(&app).map_err(anyhow::Error::msg)?;
    let path = archive.to_path_buf();
    let (size, blake3) = tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, String)> {
        let file =
            std::fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?;
        Package::open(&path, &ArchiveLimits::default())
            .with_context(|| format!("{} is not a valid package", path.display()))?;
        let mut hasher = blake3::Hasher::new();
        let size = hasher.update_reader(file)?.count();
        Ok((size, hasher.finalize().to_hex().to_string()))
    })
    .await??;
    Ok(PreparedRelease {
        archive: archive.to_path_buf(),
        app,
        version,
        size,
        blake3,
    })
}

/// The CI path: check the archive, upload it to the incoming store under its hash-derived name,
/// and publish `release.published`.
pub async fn publish(bus: &Bus, req: PublishRequest<'_>) -> anyhow::Result<ReleasePublished> {
    let prepared = prepare_release(req.archive, req.app, req.version).await?;
    publish_prepared(bus, prepared, req.published_by, req.progress).await
}

pub async fn publish_prepared(
    bus: &Bus,
    prepared: PreparedRelease,
    published_by: Option<String>,
    progress: Option<&(dyn Fn(u64, u64) + Sync)>,
) -> anyhow::Result<ReleasePublished> {
    let PreparedRelease {
        archive,
        app,
        version,
        size,
        blake3,
    } = prepared;
    let object = names::archive_object(&app, &version, &blake3);
    let file = tokio::fs::File::open(&archive)
        .await
        .with_context(|| format!("opening {}", archive.display()))?;
    let mut reader = ProgressReader {
        inner: file,
        done: 0,
        total: size,
        progress,
    };
    bus.upload_archive(&object, &mut reader)
        .await
        .map_err(anyhow::Error::msg)?;
    let event = ReleasePublished {
        app,
        version,
        object,
        size,
        blake3,
        published_by,
    };
    let msg_id = format!("published.{}", event.object);
    bus.publish_event(RELEASE_PUBLISHED, &event, Encoding::Json, Some(&msg_id))
        .await?;
    Ok(event)
}

struct ProgressReader<'a, R> {
    inner: R,
    done: u64,
    total: u64,
    progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ProgressReader<'_, R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        self.done += read;
        if let Some(progress) = self.progress {
            progress(self.done, self.total);
        }
        poll
    }
}

/// Waits until the release is stored or rejected, reading its record (which the watcher, signer
/// and distributor keep), and returns it.
pub async fn wait_for_release(
    bus: &Bus,
    app: &str,
    version: &Version,
    timeout: Duration,
) -> anyhow::Result<ReleaseRecord> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(record) = bus
            .release_record(app, version)
            .await
            .map_err(anyhow::Error::msg)?
            && record.state != ReleaseState::Signed
        {
            return Ok(record);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{app} {version} was neither stored nor rejected within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every release record, newest version first within each app.
pub async fn releases(bus: &Bus, app: Option<&str>) -> anyhow::Result<Vec<ReleaseRecord>> {
    let mut keys = match bus.releases.keys().await {
        Ok(keys) => keys,
        Err(e) => bail!("listing releases: {e}"),
    };
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key?;
        if app.is_some_and(|a| !key.starts_with(&format!("{a}."))) {
            continue;
        }
        if let Some(bytes) = bus.releases.get(&key).await? {
            match Encoding::Json.decode::<ReleaseRecord>(&bytes) {
                Ok(record) => out.push(record),
                Err(e) => tracing::warn!(%key, error = %e, "unreadable release record"),
            }
        }
    }
    out.sort_by(|a, b| a.app.cmp(&b.app).then(b.version.cmp(&a.version)));
    Ok(out)
}

/// Writes the desired state of `app` in `ring` (no rollout slots: every host switches at once).
pub async fn desire(bus: &Bus, app: &str, ring: &str, version: &Version) -> anyhow::Result<()> {
    bus.desire(app, ring, version, false)
        .await
        .map_err(anyhow::Error::msg)
}

/// Sends an operator command to the tracker (request/reply on the command's subject).
pub async fn tracker(bus: &Bus, command: &Command) -> anyhow::Result<Reply> {
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        bus.client
            .request(command.subject(), serde_json::to_vec(command)?.into()),
    )
    .await
    .context("the tracker did not answer within 10 s")?
    .map_err(|e| anyhow::anyhow!("no tracker answered: {e}"))?;
    Ok(serde_json::from_slice(&answer.payload)?)
}

/// Follows `app`'s rollout until it completes, halts or is aborted, with a bar per ring
/// (hosts done of the ring's live hosts). Returns how it ended. With `version`, first waits
/// for the rollout of that version to exist (CI publishes, then watches at once).
pub async fn watch_rollout(
    bus: &Bus,
    app: &str,
    version: Option<&Version>,
) -> anyhow::Result<RolloutView> {
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg}")?
        .progress_chars("=> ");
    let header = bars.add(ProgressBar::new_spinner());
    let mut rings: Vec<ProgressBar> = Vec::new();
    loop {
        let reply = tracker(bus, &Command::Show { app: app.into() }).await?;
        let view = match (reply.rollout, version) {
            // The awaited version's rollout was replaced (by a newer release, or a rollback):
            // it will not come. The caller sees another version and says so.
            (Some(view), Some(v)) if view.rollout.superseded.contains(v) => return Ok(view),
            // Another version's rollout (an earlier one, or the one a rollback replaces).
            (Some(view), Some(v)) if view.rollout.version != *v => None,
            (Some(view), _) => Some(view),
            (None, Some(_)) => None,
            (None, None) => bail!("{}", reply.message),
        };
        let Some(view) = view else {
            if let Some(v) = version {
                header.set_message(format!("waiting for the rollout of {app} {v}"));
                header.tick();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let r = &view.rollout;
        let phase = match (r.phase, r.paused) {
            (_, true) => "paused".to_string(),
            (Phase::AwaitingApproval, _) => format!("awaiting approval (fleetcast approve {app})"),
            (phase, _) => fleetcast_runtime::metrics::label_value(&phase),
        };
        header.set_message(format!("{app} {}: {phase}", r.version));
        for (i, ring) in view.rings.iter().enumerate() {
            if rings.len() <= i {
                let bar = bars.add(ProgressBar::new(0).with_style(style.clone()));
                bar.set_prefix(ring.ring.clone());
                rings.push(bar);
            }
            let bar = &rings[i];
            bar.set_length(ring.targets as u64);
            bar.set_position(ring.done as u64);
            bar.set_message(format!(
                "{} failed, {} switching, {} stale",
                ring.failed, ring.switching, ring.stale
            ));
        }
        if !r.is_active() {
            header.finish();
            for bar in &rings {
                bar.finish();
            }
            return Ok(view);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Asks for a rollback of `app` (or one `ring`) to `to`, an earlier stored release; it replaces
/// every version up to the newest stored one. The signer issues the directive, the tracker
/// rolls it out. Returns the newest version it replaces.
pub async fn request_rollback(
    bus: &Bus,
    app: &str,
    to: &Version,
    ring: Option<&str>,
) -> anyhow::Result<Version> {
    let stored: Vec<Version> = releases(bus, Some(app))
        .await?
        .into_iter()
        .filter(|r| r.state == ReleaseState::Stored)
        .map(|r| r.version)
        .collect();
    if !stored.contains(to) {
        bail!("{app} {to} is not a stored release");
    }
    let from = stored
        .into_iter()
        .max()
        .filter(|newest| newest > to)
        .with_context(|| format!("no stored release of {app} newer than {to} to roll back from"))?;
    let request = fleetcast_events::v1::RollbackRequested {
        app: app.into(),
        to: to.clone(),
        from: from.clone(),
        ring: ring.map(String::from),
        requested_by: std::env::var("USER").unwrap_or_else(|_| "fleetcast".into()),
    };
    let msg_id = format!(
        "rollback-requested.{app}.{to}.{from}.{}",
        ring.unwrap_or("all")
    );
    bus.publish_event(
        names::ROLLBACK_REQUESTED,
        &request,
        Encoding::Json,
        Some(&msg_id),
    )
    .await?;
    Ok(from)
}
