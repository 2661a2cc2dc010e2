//! The `fleetcast` operator command's actions, as a library so end-to-end tests drive exactly
//! what CI runs.

pub mod command_line;
pub mod root;

pub use command_line::main;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream::kv;
use fleetcast_events::names;
use fleetcast_events::tracker::{Command, Phase, Reply, RolloutSummary};
use fleetcast_events::v1::{RejectCode, Rejection, ReleasePublished, ReleaseRecord, ReleaseState};
use fleetcast_events::{AppName, Encoding, RingName, SecretKey};
use fleetcast_package::{ArchiveLimits, Package, parse_package_file_name};
use fleetcast_runtime::releases::ReleaseRevisions;
use fleetcast_runtime::{Bus, Desired, Incoming, NatsSettings, Records};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use semver::Version;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

/// The CLI's connection. Each command binds only what it uses, on first use (CI's credentials
/// may publish and watch rollouts, and nothing of desired states or trust), waiting up to the
/// connect timeout for a service to have created it.
pub struct CliBus {
    bus: Bus,
    url: String,
    timeout: Duration,
    records: OnceCell<Records>,
    incoming: OnceCell<Incoming>,
    desired: OnceCell<Desired>,
    trust: OnceCell<kv::Store>,
}

fleetcast_runtime::bus_role!(CliBus);

impl CliBus {
    /// The CLI's handle on a connection made elsewhere (tools and benchmarks that also create
    /// the streams), binding with the same `timeout`; `url` names it in errors.
    pub fn on(bus: Bus, url: &str, timeout: Duration) -> CliBus {
        CliBus {
            bus,
            url: url.to_string(),
            timeout,
            records: OnceCell::new(),
            incoming: OnceCell::new(),
            desired: OnceCell::new(),
            trust: OnceCell::new(),
        }
    }

    /// The release records.
    pub async fn records(&self) -> anyhow::Result<&Records> {
        self.records
            .get_or_try_init(|| self.bind(|| Records::bind(&self.bus)))
            .await
    }

    /// The incoming archives.
    pub async fn incoming(&self) -> anyhow::Result<&Incoming> {
        self.incoming
            .get_or_try_init(|| self.bind(|| Incoming::bind(&self.bus)))
            .await
    }

    /// The desired states.
    pub async fn desired(&self) -> anyhow::Result<&Desired> {
        self.desired
            .get_or_try_init(|| self.bind(|| Desired::bind(&self.bus)))
            .await
    }

    /// The trust bucket (roots, timestamp).
    pub async fn trust(&self) -> anyhow::Result<&kv::Store> {
        self.trust
            .get_or_try_init(|| self.bind(|| self.bus.bucket(names::TRUST_BUCKET)))
            .await
    }

    async fn bind<T, F, Fut>(&self, bind: F) -> anyhow::Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, fleetcast_runtime::BusError>>,
    {
        let bound = within(self.timeout, |cancel| async move {
            self.bus.bind(&cancel, bind).await
        })
        .await;
        bound.map_err(|e| self.unreachable(e))
    }

    fn unreachable(&self, e: fleetcast_runtime::BusError) -> anyhow::Error {
        unreachable_error(&self.url, self.timeout, e)
    }
}

/// Connects, or fails after `timeout` with a message that says where it tried.
pub async fn connect(settings: &NatsSettings, timeout: Duration) -> anyhow::Result<CliBus> {
    let bus = within(timeout, |cancel| async move {
        Bus::attach(settings, "fleetcast-cli", &cancel).await
    })
    .await
    .map_err(|e| unreachable_error(&settings.url, timeout, e))?;
    Ok(CliBus::on(bus, &settings.url, timeout))
}

/// Runs `attempt` with a cancellation token that fires after `timeout`.
async fn within<T, F, Fut>(timeout: Duration, attempt: F) -> T
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let cancel = CancellationToken::new();
    let guard = cancel.clone();
    let timer = tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        guard.cancel();
    });
    let out = attempt(cancel).await;
    timer.abort();
    out
}

fn unreachable_error(
    url: &str,
    timeout: Duration,
    e: fleetcast_runtime::BusError,
) -> anyhow::Error {
    match e {
        // Our own timer stopped the attempt: the server did not answer (or its JetStream was
        // not ready) in time, which is what the operator needs to hear, with where it tried.
        fleetcast_runtime::BusError::Cancelled => anyhow::anyhow!(
            "cannot reach NATS at {url}: unreachable, or JetStream not ready, within {}",
            humantime_serde::re::humantime::format_duration(timeout)
        ),
        e => anyhow::Error::new(e).context(format!("cannot reach NATS at {url}")),
    }
}

/// `fleetcast`'s exit codes: one table, shown by `fleetcast --help` and in README.md.
pub mod exit {
    /// Done: published and stored, rollout completed, command accepted.
    pub const OK: u8 = 0;
    /// Could not do it: NATS unreachable, timeout, I/O, the tracker refused the command.
    pub const ERROR: u8 = 1;
    /// Bad arguments.
    pub const USAGE: u8 = 2;
    /// Rejected: the archive was refused (locally before uploading, or by the watcher, signer
    /// or distributor; the reason code is printed), or the rollout halted.
    pub const REJECTED: u8 = 3;
    /// The rollout was aborted by an operator.
    pub const ABORTED: u8 = 4;
    /// `rollout watch --version V`: V's rollout was superseded (by a newer release or a
    /// rollback), before it ended or already before the watch began.
    pub const SUPERSEDED: u8 = 5;
    /// `rollout watch --version V`: V is not a stored release of the app (never published,
    /// or rejected).
    pub const UNKNOWN_VERSION: u8 = 6;

    /// The table as `fleetcast --help` prints it.
    pub const TABLE: &str = "\
Exit codes:
  0  done: published and stored (publish --wait), rollout completed, command accepted
  1  error: NATS unreachable, timeout, I/O, a command the tracker refused
  2  bad arguments
  3  rejected: the archive was refused, locally before uploading or by the pipeline (the
     reason code is printed, e.g. version_not_newer), or the rollout halted
  4  the rollout was aborted
  5  rollout watch --version V: V was superseded by a newer release or a rollback
  6  rollout watch --version V: V is not a stored release (never published, or rejected)";
}

/// The CLI refused an archive before uploading it, for the reason the watcher would give.
#[derive(Debug)]
pub struct LocalRefusal {
    pub archive: PathBuf,
    pub reason: Rejection,
}

impl std::fmt::Display for LocalRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rejected {} before uploading: {}",
            self.archive.display(),
            self.reason
        )
    }
}

impl std::error::Error for LocalRefusal {}

/// `rollout watch --version V` of a version that is not a stored release.
#[derive(Debug)]
pub struct UnknownVersion {
    pub app: String,
    pub version: Version,
    /// What the releases bucket says instead (absent, or rejected with a reason).
    pub detail: String,
}

impl std::fmt::Display for UnknownVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} is not a stored release ({}): no rollout of it will come (publish with --wait first)",
            self.app, self.version, self.detail
        )
    }
}

impl std::error::Error for UnknownVersion {}

/// How long ago `at` was, as a person reads it (`45s ago`, `12m ago`, `3h ago`, `5d ago`);
/// a time ahead of `now` (clocks differ a little) reads `just now`.
pub fn ago(at: time::OffsetDateTime, now: time::OffsetDateTime) -> String {
    let s = (now - at).whole_seconds();
    match s {
        i64::MIN..=0 => "just now".into(),
        1..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        7200..=172_799 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// A size as a person reads it: `512 B`, `46.8 KiB`, `30 MiB`.
pub fn size(n: u64) -> String {
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut units = ["KiB", "MiB", "GiB", "TiB"].iter().peekable();
    let mut unit = "KiB";
    while let Some(u) = units.next() {
        unit = u;
        if v < 1024.0 || units.peek().is_none() {
            break;
        }
        v /= 1024.0;
    }
    if v < 10.0 {
        format!("{v:.1} {unit}")
    } else {
        format!("{v:.0} {unit}")
    }
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
    pub app: AppName,
    pub version: Version,
    pub size: u64,
    pub blake3: String,
}

/// Checks the archive locally with the same rules the watcher applies, under `limits` (the
/// watcher's `limits.*`; the defaults are the services' defaults), so CI fails early, even
/// without NATS; and works out its app, version and hash. A refusal is a [`LocalRefusal`]
/// carrying the watcher's reason code.
pub async fn prepare_release(
    archive: &Path,
    app: Option<String>,
    version: Option<Version>,
    limits: &ArchiveLimits,
) -> anyhow::Result<PreparedRelease> {
    let refuse = |code: RejectCode, message: String| LocalRefusal {
        archive: archive.to_path_buf(),
        reason: Rejection { code, message },
    };
    let file_name = archive
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    // A name given is checked here; one read from the file name was checked as it was read.
    let app = app
        .map(AppName::try_from)
        .transpose()
        .map_err(|e| refuse(RejectCode::InvalidName, e.to_string()))?;
    let (app, version) = match (app, version) {
        (Some(app), Some(version)) => (app, version),
        (app, version) => {
            let parsed = parse_package_file_name(file_name).map_err(|e| {
                refuse(
                    RejectCode::InvalidName,
                    format!("{e}; or give --app and --version"),
                )
            })?;
            (app.unwrap_or(parsed.app), version.unwrap_or(parsed.version))
        }
    };
    let path = archive.to_path_buf();
    let limits = limits.clone();
    let (size, blake3) = tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, String)> {
        let file =
            std::fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?;
        if let Err(e) = Package::open(&path, &limits) {
            return Err(LocalRefusal {
                archive: path,
                reason: e.rejection(),
            }
            .into());
        }
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
pub async fn publish(bus: &CliBus, req: PublishRequest<'_>) -> anyhow::Result<ReleasePublished> {
    let prepared =
        prepare_release(req.archive, req.app, req.version, &ArchiveLimits::default()).await?;
    publish_prepared(bus, prepared, req.published_by, req.progress).await
}

pub async fn publish_prepared(
    bus: &CliBus,
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
    bus.incoming()
        .await?
        .upload_archive(&object, &mut reader)
        .await?;
    let event = ReleasePublished {
        app: app.to_string(),
        version,
        object,
        size,
        blake3,
        published_by,
    };
    let msg_id = format!("published.{}", event.object);
    // On the subject of this connection's user: the history says who published it.
    let subject = names::release_published_subject(&bus.user);
    bus.publish_event(&subject, &event, Encoding::Json, Some(&msg_id))
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

/// Waits until the *version* is stored or rejected, reading its record (which the watcher,
/// signer and distributor keep), and returns it. It says nothing about which archive: to learn
/// the outcome of one just published, use [`wait_for_archive`] (what `publish --wait` does).
pub async fn wait_for_release(
    bus: &CliBus,
    app: &str,
    version: &Version,
    timeout: Duration,
) -> anyhow::Result<ReleaseRecord> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(record) = bus.records().await?.release_record(app, version).await?
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

/// The revisions of the records that will tell `published`'s outcome, read before publishing
/// it: [`wait_for_archive`] judges only what is written after them (an earlier refusal of the
/// same bytes is not this attempt's).
pub async fn outcome_baseline(
    bus: &CliBus,
    prepared: &PreparedRelease,
) -> anyhow::Result<ReleaseRevisions> {
    Ok(bus
        .records()
        .await?
        .release_revisions(&prepared.app, &prepared.version, &prepared.blake3)
        .await?)
}

/// The record of `prepared`'s archive when exactly these bytes are already stored.
pub async fn already_stored(
    bus: &CliBus,
    prepared: &PreparedRelease,
    since: ReleaseRevisions,
) -> anyhow::Result<Option<ReleaseRecord>> {
    let outcome = bus
        .records()
        .await?
        .archive_outcome(&prepared.app, &prepared.version, &prepared.blake3, since)
        .await?;
    Ok(outcome.filter(|r| r.state == ReleaseState::Stored))
}

/// Waits for the outcome of *this* archive (by its BLAKE3), not of its version: stored, or
/// rejected by the watcher, signer or distributor (a different archive reusing a stored
/// version is refused without touching the version's record, under a key of its own).
pub async fn wait_for_archive(
    bus: &CliBus,
    published: &ReleasePublished,
    since: ReleaseRevisions,
    timeout: Duration,
) -> anyhow::Result<ReleaseRecord> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(record) = bus
            .records()
            .await?
            .archive_outcome(&published.app, &published.version, &published.blake3, since)
            .await?
        {
            return Ok(record);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "{} {} (blake3 {}) was neither stored nor rejected within {}",
                published.app,
                published.version,
                published.blake3,
                humantime_serde::re::humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every release record, newest version first within each app ([`Bus::release_records`]).
pub async fn releases(bus: &CliBus, app: Option<&str>) -> anyhow::Result<Vec<ReleaseRecord>> {
    Ok(bus.records().await?.release_records(app).await?)
}

/// Writes the desired state of `app` in `ring` (no rollout slots: every host switches at once).
pub async fn desire(
    bus: &CliBus,
    app: &AppName,
    ring: &RingName,
    version: &Version,
) -> anyhow::Result<()> {
    let records = bus.records().await?;
    Ok(bus
        .desired()
        .await?
        .desire(records, app, ring, version, false)
        .await?)
}

/// Sends an operator command to the tracker (request/reply on the command's subject).
pub async fn tracker(bus: &CliBus, command: &Command) -> anyhow::Result<Reply> {
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        bus.client.request(
            command.subject(&bus.user),
            serde_json::to_vec(command)?.into(),
        ),
    )
    .await
    .context("the tracker did not answer within 10 s")?
    .map_err(|e| anyhow::anyhow!("no tracker answered: {e}"))?;
    Ok(serde_json::from_slice(&answer.payload)?)
}

/// How long `rollout watch --version V` waits for V's rollout when V is an earlier version
/// than the rollout under way: a rollback to V just requested takes the signer and tracker a
/// moment; after this V counts as superseded.
const ROLLBACK_GRACE: Duration = Duration::from_secs(15);

/// Whether `app` `version` is a stored release: `Ok(true)` stored, `Ok(false)` still on its
/// way (signed), [`UnknownVersion`] otherwise.
async fn check_stored(bus: &CliBus, app: &str, version: &Version) -> anyhow::Result<bool> {
    let record = bus.records().await?.release_record(app, version).await?;
    let detail = match record {
        Some(r) if r.state == ReleaseState::Stored => return Ok(true),
        Some(r) if r.state == ReleaseState::Signed => return Ok(false),
        Some(r) => match r.reason {
            Some(reason) => format!("rejected: {reason}"),
            None => "rejected".into(),
        },
        None => "never published".into(),
    };
    Err(UnknownVersion {
        app: app.into(),
        version: version.clone(),
        detail,
    }
    .into())
}

/// Follows `app`'s rollout until it completes, halts or is aborted, and returns how it ended:
/// on a terminal a bar per ring (hosts done of the ring's live hosts), otherwise one plain
/// line per change (CI logs). With `version`, first waits for the rollout of that version
/// (CI publishes, then watches at once); fails at once with [`UnknownVersion`] when it is not
/// a stored release, and returns the rollout that replaced it when it was superseded (the
/// returned view is then of another version).
pub async fn watch_rollout(
    bus: &CliBus,
    app: &AppName,
    version: Option<&Version>,
) -> anyhow::Result<RolloutSummary> {
    use std::io::IsTerminal;
    let mut progress = if std::io::stdout().is_terminal() {
        Progress::bars()?
    } else {
        Progress::lines()
    };
    let mut stored = false;
    let mut earlier_since: Option<tokio::time::Instant> = None;
    loop {
        if let Some(v) = version
            && !stored
        {
            stored = check_stored(bus, app, v).await?;
        }
        let reply = tracker(bus, &Command::Show { app: app.clone() }).await?;
        let view = match (reply.rollout, version) {
            // The awaited version's rollout was replaced (by a newer release, or a rollback):
            // it will not come. The caller sees another version and says so.
            (Some(view), Some(v)) if view.superseded.contains(v) => {
                progress.end(false);
                return Ok(view);
            }
            // Another version's rollout. A newer stored V will replace it once the tracker
            // takes V up; an earlier V (or any V while a rollback runs) only by a rollback to
            // V, which comes within moments of being requested, or V is long superseded.
            (Some(view), Some(v)) if view.version != *v => {
                let newer_release = *v > view.version && !view.rollback;
                if stored && !newer_release {
                    let since = *earlier_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= ROLLBACK_GRACE {
                        progress.end(false);
                        return Ok(view);
                    }
                } else {
                    earlier_since = None;
                }
                None
            }
            (Some(view), _) => Some(view),
            (None, Some(_)) => None,
            (None, None) => bail!("{}", reply.message),
        };
        let Some(view) = view else {
            if let Some(v) = version {
                progress.waiting(&format!("waiting for the rollout of {app} {v}"));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        progress.show(app, &view)?;
        if !view.phase.is_active() {
            progress.end(view.phase == Phase::Completed);
            return Ok(view);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How `rollout watch` shows progress: bars on a terminal, plain lines elsewhere.
enum Progress {
    Bars {
        bars: MultiProgress,
        style: ProgressStyle,
        header: ProgressBar,
        rings: Vec<ProgressBar>,
    },
    /// The last line printed per subject (the header, each ring): a line is printed only when
    /// its subject's state changed.
    Lines { last: Vec<String> },
}

impl Progress {
    fn bars() -> anyhow::Result<Progress> {
        let bars = MultiProgress::new();
        let style = ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg}")?
            .progress_chars("=> ");
        let header = bars.add(ProgressBar::new_spinner());
        Ok(Progress::Bars {
            bars,
            style,
            header,
            rings: Vec::new(),
        })
    }

    fn lines() -> Progress {
        Progress::Lines { last: Vec::new() }
    }

    /// Prints `line` as subject `slot` unless it is what that subject last printed.
    fn line(last: &mut Vec<String>, slot: usize, line: String) {
        if last.len() <= slot {
            last.resize(slot + 1, String::new());
        }
        if last[slot] != line {
            println!("{line}");
            last[slot] = line;
        }
    }

    fn waiting(&mut self, message: &str) {
        match self {
            Progress::Bars { header, .. } => {
                header.set_message(message.to_string());
                header.tick();
            }
            Progress::Lines { last } => Progress::line(last, 0, message.to_string()),
        }
    }

    fn show(&mut self, app: &str, r: &RolloutSummary) -> anyhow::Result<()> {
        let phase = match (r.phase, r.paused) {
            (_, true) => "paused".to_string(),
            (Phase::AwaitingApproval, _) => format!("awaiting approval (fleetcast approve {app})"),
            (phase, _) => fleetcast_runtime::metrics::label_value(&phase),
        };
        let header_text = format!("{app} {}: {phase}", r.version);
        match self {
            Progress::Bars {
                bars,
                style,
                header,
                rings,
            } => {
                header.set_message(header_text);
                for (i, ring) in r.rings.iter().enumerate() {
                    if rings.len() <= i {
                        let bar = bars.add(ProgressBar::new(0).with_style(style.clone()));
                        bar.set_prefix(ring.ring.to_string());
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
            }
            Progress::Lines { last } => {
                let header_text = match &r.reason {
                    Some(reason) if !r.phase.is_active() => format!("{header_text}: {reason}"),
                    _ => header_text,
                };
                Progress::line(last, 0, header_text);
                for (i, ring) in r.rings.iter().enumerate() {
                    Progress::line(
                        last,
                        i + 1,
                        format!(
                            "{app} {} ring {}: {}/{} done, {} failed, {} switching, {} stale",
                            r.version,
                            ring.ring,
                            ring.done,
                            ring.targets,
                            ring.failed,
                            ring.switching,
                            ring.stale
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// Ends the display: a completed rollout's bars finish; otherwise each bar stays where its
    /// ring got to (`abandon`), so a ring that got nothing does not look complete.
    fn end(&mut self, completed: bool) {
        if let Progress::Bars { header, rings, .. } = self {
            for bar in std::iter::once(&*header).chain(rings.iter()) {
                if completed {
                    bar.finish();
                } else {
                    bar.abandon();
                }
            }
        }
    }
}

/// Asks for a rollback of `app` (or one `ring`) to `to`, an earlier stored release, as this
/// NATS user ([`Bus::request_rollback`]). Returns the newest version it replaces.
pub async fn request_rollback(
    bus: &CliBus,
    app: &AppName,
    to: &Version,
    ring: Option<&RingName>,
) -> anyhow::Result<Version> {
    let requested_by = std::env::var("USER").unwrap_or_else(|_| "fleetcast".into());
    bus.records()
        .await?
        .request_rollback(bus, app, to, ring, &bus.user, &requested_by)
        .await
        .map_err(anyhow::Error::from)
}

/// One history entry on one line: when, what, about which app, version, ring and host, who,
/// and why.
pub fn history_line(e: &fleetcast_events::v1::HistoryEntry) -> String {
    let at =
        e.at.replace_nanosecond(0)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
    let mut line = format!("{at}  {:<18}", e.kind.to_string());
    let action = e.action.as_ref().map(|action| {
        if e.refused {
            format!("{action} (refused)")
        } else {
            action.clone()
        }
    });
    // The fields an entry has, in this order, each after its label.
    let fields = [
        ("", e.app.as_ref().map(ToString::to_string)),
        ("", e.version.as_ref().map(ToString::to_string)),
        ("", action),
        ("ring=", e.ring.as_ref().map(ToString::to_string)),
        ("where ", e.target.as_ref().map(ToString::to_string)),
        ("host=", e.agent.as_ref().map(ToString::to_string)),
        ("by=", e.actor.clone()),
    ];
    for (label, value) in fields {
        if let Some(value) = value {
            line.push_str(&format!(" {label}{value}"));
        }
    }
    match (&e.code, &e.reason) {
        (Some(code), Some(reason)) => line.push_str(&format!(": {code}: {reason}")),
        (None, Some(reason)) => line.push_str(&format!(": {reason}")),
        (Some(code), None) => line.push_str(&format!(": {code}")),
        (None, None) => {}
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_line_says_when_what_who_and_why() {
        use fleetcast_events::v1::{HistoryEntry, HistoryKind, RejectCode};
        let mut e = HistoryEntry::new(
            HistoryKind::OperatorAction,
            time::macros::datetime!(2026-12-06 12:00:00.123 UTC),
        );
        e.app = Some(AppName::from_static("demo"));
        e.version = Some("1.2.0".parse().expect("version"));
        e.action = Some("approve".into());
        e.actor = Some("alice".into());
        e.refused = true;
        e.reason = Some("no rollout of demo".into());
        assert_eq!(
            history_line(&e),
            "2026-12-06T12:00:00Z  operator.action    demo 1.2.0 approve (refused) by=alice: no rollout of demo"
        );
        let mut e = HistoryEntry::new(HistoryKind::ReleaseRejected, e.at);
        e.app = Some(AppName::from_static("demo"));
        e.code = Some(RejectCode::VersionNotNewer);
        e.reason = Some("1.0.0 is not newer than 1.2.0".into());
        e.actor = Some("signer".into());
        assert!(
            history_line(&e)
                .ends_with("by=signer: version_not_newer: 1.0.0 is not newer than 1.2.0")
        );
    }

    #[test]
    fn ages_read_as_a_person_says_them() {
        let now = time::macros::datetime!(2026-12-06 12:00 UTC);
        let before = |s: i64| now - time::Duration::seconds(s);
        assert_eq!(ago(now + time::Duration::seconds(3), now), "just now");
        assert_eq!(ago(before(45), now), "45s ago");
        assert_eq!(ago(before(12 * 60 + 5), now), "12m ago");
        assert_eq!(ago(before(3 * 3600), now), "3h ago");
        assert_eq!(ago(before(5 * 86_400), now), "5d ago");
    }
}
