//! The drop folder: file-system events (plus a periodic rescan, in case one is missed) mark a
//! file as a candidate; it is read only once its size and modification time have held still for
//! the settle time, so a file still being copied is never read half-written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use fleetcast_events::names;
use fleetcast_events::v1::{PackageDetected, PackageSource, RejectCode, Rejection};
use fleetcast_package::PackageName;
use fleetcast_package::name::{NameVerdict, classify_file_name};
use fleetcast_runtime::BusError;
use notify::Watcher as _;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{Watcher, WatcherError, inspect};

/// Why a dropped file could not be taken now. Each leaves the file where it is, to be tried
/// again: a file refused for what it is is moved to `rejected/` instead, which is no error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DropError {
    #[error("validation task failed: {0}")]
    Validation(tokio::task::JoinError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The incoming store refused the upload.
    #[error(transparent)]
    Upload(#[from] fleetcast_runtime::releases::UploadError),
    #[error(transparent)]
    Announce(#[from] BusError),
    /// The refusal could not be recorded or published.
    #[error("{0}")]
    Refusal(String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Observation {
    len: u64,
    modified: Option<SystemTime>,
}

struct Pending {
    seen: Observation,
    /// When the file was last seen to change (or when a retry may happen).
    since: Instant,
}

fn observe(path: &Path) -> Option<Observation> {
    let meta = std::fs::metadata(path).ok()?;
    meta.is_file().then(|| Observation {
        len: meta.len(),
        modified: meta.modified().ok(),
    })
}

/// The files of the drop folder waiting to hold still for the settle time. Decisions only:
/// what is seen of each file is handed in, so this is tested without a file system.
struct Settling {
    pending: HashMap<PathBuf, Pending>,
    settle: Duration,
}

impl Settling {
    fn new(settle: Duration) -> Self {
        Settling {
            pending: HashMap::new(),
            settle,
        }
    }

    /// A file seen as `seen` at `now`: a new or changed file starts its settle time again;
    /// one gone is forgotten.
    fn saw(&mut self, path: PathBuf, seen: Option<Observation>, now: Instant) {
        let Some(seen) = seen else {
            self.pending.remove(&path);
            return;
        };
        let entry = self
            .pending
            .entry(path)
            .or_insert(Pending { seen, since: now });
        if entry.seen != seen {
            *entry = Pending { seen, since: now };
        }
    }

    /// The files that held still for the settle time up to `now`, given how each is now
    /// (`observe`); a file that changed starts over, one gone is forgotten.
    fn ready(
        &mut self,
        now: Instant,
        mut observe: impl FnMut(&Path) -> Option<Observation>,
    ) -> Vec<PathBuf> {
        let mut ready = Vec::new();
        self.pending.retain(|path, p| match observe(path) {
            None => false,
            Some(seen) if seen != p.seen => {
                *p = Pending { seen, since: now };
                true
            }
            Some(_) => {
                if now.duration_since(p.since) >= self.settle {
                    ready.push(path.clone());
                }
                true
            }
        });
        ready
    }

    /// A file taken (or refused and moved aside): nothing more to wait for.
    fn taken(&mut self, path: &Path) {
        self.pending.remove(path);
    }

    /// A file that could not be taken (NATS unavailable or similar): it stays, and is tried
    /// again after a few settle times rather than at every check.
    fn retry_later(&mut self, path: &Path, now: Instant) {
        if let Some(p) = self.pending.get_mut(path) {
            p.since = now + self.settle * 4;
        }
    }
}

/// A file the watcher looks at: directly in the drop folder, and not hidden or temporary.
fn is_candidate(drop_dir: &Path, path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str());
    path.parent() == Some(drop_dir)
        && name.is_some_and(|name| classify_file_name(name) != NameVerdict::Ignore)
}

/// Starts watching `dir`: the paths the file system says changed. The watch lasts as long as
/// the returned watcher.
fn changes_in(
    dir: &Path,
) -> Result<(notify::RecommendedWatcher, UnboundedReceiver<PathBuf>), WatcherError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
    let mut fs_watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res {
            for path in event.paths {
                let _ = tx.send(path);
            }
        }
    })
    .map_err(|e| WatcherError::watch(dir, e))?;
    fs_watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .map_err(|e| WatcherError::watch(dir, e))?;
    Ok((fs_watcher, rx))
}

pub(crate) async fn watch(
    watcher: Watcher,
    shutdown: CancellationToken,
) -> Result<(), WatcherError> {
    let s = watcher.settings.clone();
    for dir in [&s.drop_dir, &s.rejected_dir(), &s.processed_dir()] {
        std::fs::create_dir_all(dir).map_err(|e| WatcherError::watch(dir, e))?;
    }
    let (_watching, mut changed) = changes_in(&s.drop_dir)?;
    tracing::info!(drop_dir = %s.drop_dir.display(), "watching drop folder");

    let mut settling = Settling::new(s.settle);
    let consider = |settling: &mut Settling, path: PathBuf| {
        if is_candidate(&s.drop_dir, &path) {
            let seen = observe(&path);
            settling.saw(path, seen, Instant::now());
        }
    };
    let rescan = |settling: &mut Settling| {
        if let Ok(dir) = std::fs::read_dir(&s.drop_dir) {
            for entry in dir.flatten() {
                consider(settling, entry.path());
            }
        }
    };
    rescan(&mut settling);
    let mut check = tokio::time::interval(s.settle / 4);
    let mut full = tokio::time::interval(s.rescan);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            Some(path) = changed.recv() => consider(&mut settling, path),
            _ = full.tick() => rescan(&mut settling),
            _ = check.tick() => {
                for path in settling.ready(Instant::now(), observe) {
                    if shutdown.is_cancelled() {
                        return Ok(());
                    }
                    match watcher.take_dropped_file(&path).await {
                        Ok(()) => settling.taken(&path),
                        Err(error) => {
                            tracing::warn!(file = %path.display(), %error, "will retry dropped file");
                            settling.retry_later(&path, Instant::now());
                        }
                    }
                }
            }
        }
    }
}

impl Watcher {
    /// Validates, uploads and announces one complete file, or rejects it and moves it aside.
    /// `Err` means a transient failure: the file is left where it is to be tried again.
    #[tracing::instrument(skip_all, fields(file = %path.display()))]
    async fn take_dropped_file(&self, path: &Path) -> Result<(), DropError> {
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let source = PackageSource::DropFolder {
            file: file_name.clone(),
        };
        match classify_file_name(&file_name) {
            NameVerdict::Ignore => Ok(()),
            NameVerdict::Invalid(e) => {
                let reason = Rejection {
                    code: RejectCode::InvalidName,
                    message: e.to_string(),
                };
                self.reject_dropped(path, None, source, reason).await
            }
            NameVerdict::Package(name) => self.take_package(path, name, source).await,
        }
    }

    /// Validates, uploads and announces the package in `path`, named `name`.
    #[tracing::instrument(skip_all, fields(app = %name.app, version = %name.version))]
    async fn take_package(
        &self,
        path: &Path,
        name: PackageName,
        source: PackageSource,
    ) -> Result<(), DropError> {
        let limits = self.settings.limits.clone();
        let owned = path.to_path_buf();
        let inspected = match tokio::task::spawn_blocking(move || inspect(&owned, &limits)).await {
            Ok(Ok(i)) => i,
            Ok(Err(e)) => {
                return self
                    .reject_dropped(path, Some(&name), source, e.rejection())
                    .await;
            }
            Err(e) => return Err(DropError::Validation(e)),
        };
        let object = names::archive_object(&name.app, &name.version, &inspected.blake3);
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|source| DropError::Read {
                path: path.display().to_string(),
                source,
            })?;
        self.bus.incoming.upload_archive(&object, &mut file).await?;
        let detected = PackageDetected {
            app: name.app,
            version: name.version,
            object,
            size: inspected.size,
            blake3: inspected.blake3,
            source,
        };
        self.announce(&detected).await?;
        move_into(path, &self.settings.processed_dir(), None);
        Ok(())
    }

    async fn reject_dropped(
        &self,
        path: &Path,
        name: Option<&PackageName>,
        source: PackageSource,
        reason: Rejection,
    ) -> Result<(), DropError> {
        let note = format!("{reason}\n");
        match self
            .reject_package(
                name.map(|n| &n.app),
                name.map(|n| &n.version),
                source,
                reason,
                None,
                None,
            )
            .await
        {
            crate::Outcome::Done => {
                move_into(path, &self.settings.rejected_dir(), Some(&note));
                Ok(())
            }
            crate::Outcome::Retry(e) | crate::Outcome::RetryAfter(e, _) => {
                Err(DropError::Refusal(e))
            }
        }
    }
}

/// Moves a file into `dir` (replacing a file of the same name), with an optional note beside it.
fn move_into(path: &Path, dir: &Path, note: Option<&str>) {
    let Some(name) = path.file_name() else { return };
    let dest = dir.join(name);
    // The note first: whoever sees the moved file can read why.
    if let Some(note) = note {
        let mut reason_file = dest.clone().into_os_string();
        reason_file.push(".reason.txt");
        if let Err(e) = std::fs::write(&reason_file, note) {
            tracing::warn!(error = %e, "cannot write rejection note");
        }
    }
    if let Err(e) = std::fs::rename(path, &dest) {
        tracing::error!(file = %path.display(), dest = %dest.display(), error = %e, "cannot move file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(len: u64) -> Option<Observation> {
        Some(Observation {
            len,
            modified: None,
        })
    }

    #[test]
    fn a_file_is_ready_once_it_held_still_for_the_settle_time() {
        let settle = Duration::from_secs(4);
        let start = Instant::now();
        let file = PathBuf::from("drop/web-1.0.0.zip");
        let mut settling = Settling::new(settle);
        settling.saw(file.clone(), seen(10), start);
        assert!(settling.ready(start + settle / 2, |_| seen(10)).is_empty());
        // Still being copied: it grew, so its settle time starts again.
        assert!(settling.ready(start + settle, |_| seen(20)).is_empty());
        assert!(
            settling
                .ready(start + settle * 3 / 2, |_| seen(20))
                .is_empty()
        );
        assert_eq!(
            settling.ready(start + settle * 2, |_| seen(20)),
            std::slice::from_ref(&file)
        );
        // A file seen again unchanged keeps its time; changed, it starts over.
        settling.saw(file.clone(), seen(20), start + settle * 2);
        assert_eq!(
            settling.ready(start + settle * 2, |_| seen(20)),
            std::slice::from_ref(&file)
        );
        settling.saw(file.clone(), seen(30), start + settle * 2);
        assert!(settling.ready(start + settle * 2, |_| seen(30)).is_empty());
    }

    #[test]
    fn a_file_gone_is_forgotten_and_one_that_failed_waits_before_another_try() {
        let settle = Duration::from_secs(4);
        let start = Instant::now();
        let (a, b) = (
            PathBuf::from("drop/a-1.0.0.zip"),
            PathBuf::from("drop/b-1.0.0.zip"),
        );
        let mut settling = Settling::new(settle);
        settling.saw(a.clone(), seen(1), start);
        settling.saw(b.clone(), seen(1), start);
        settling.saw(b.clone(), None, start);
        let later = start + settle;
        assert_eq!(settling.ready(later, |_| seen(1)), std::slice::from_ref(&a));
        settling.retry_later(&a, later);
        // Four settle times of rest, then the settle time itself.
        let again = later + settle * 5;
        let before = again - Duration::from_millis(1);
        assert!(settling.ready(before, |_| seen(1)).is_empty());
        assert_eq!(settling.ready(again, |_| seen(1)), std::slice::from_ref(&a));
        assert!(settling.ready(later, |_| None).is_empty());
        settling.saw(a.clone(), seen(1), later);
        settling.taken(&a);
        assert!(settling.ready(later + settle * 9, |_| seen(1)).is_empty());
    }

    #[test]
    fn only_files_directly_in_the_folder_that_are_not_temporary_are_looked_at() {
        let dir = Path::new("/srv/drop");
        assert!(is_candidate(dir, &dir.join("web-1.0.0.zip")));
        assert!(
            is_candidate(dir, &dir.join("notes.txt")),
            "refused, visibly"
        );
        assert!(!is_candidate(dir, &dir.join("web-1.0.0.zip.part")));
        assert!(!is_candidate(dir, &dir.join(".web-1.0.0.zip")));
        assert!(!is_candidate(dir, &dir.join("rejected/web-1.0.0.zip")));
    }
}
