//! The drop folder: file-system events (plus a periodic rescan, in case one is missed) mark a
//! file as a candidate; it is read only once its size and modification time have held still for
//! the settle time, so a file still being copied is never read half-written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use fleetcast_events::names;
use fleetcast_events::v1::{PackageDetected, PackageSource, RejectCode, Rejection};
use fleetcast_package::name::{NameVerdict, classify_file_name};
use notify::Watcher as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{Watcher, WatcherError, inspect};

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

pub(crate) async fn watch(
    watcher: Watcher,
    shutdown: CancellationToken,
) -> Result<(), WatcherError> {
    let s = watcher.settings.clone();
    for dir in [&s.drop_dir, &s.rejected_dir(), &s.processed_dir()] {
        std::fs::create_dir_all(dir).map_err(|e| WatcherError::Watch {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
    let mut fs_watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res {
            for path in event.paths {
                let _ = tx.send(path);
            }
        }
    })
    .map_err(|e| WatcherError::Watch {
        path: s.drop_dir.display().to_string(),
        reason: e.to_string(),
    })?;
    fs_watcher
        .watch(&s.drop_dir, notify::RecursiveMode::NonRecursive)
        .map_err(|e| WatcherError::Watch {
            path: s.drop_dir.display().to_string(),
            reason: e.to_string(),
        })?;
    tracing::info!(drop_dir = %s.drop_dir.display(), "watching drop folder");

    let mut pending: HashMap<PathBuf, Pending> = HashMap::new();
    let consider = |pending: &mut HashMap<PathBuf, Pending>, path: PathBuf| {
        let in_folder = path.parent() == Some(s.drop_dir.as_path());
        let name = path.file_name().and_then(|n| n.to_str()).map(str::to_owned);
        let Some(name) = name.filter(|_| in_folder) else {
            return;
        };
        if classify_file_name(&name) == NameVerdict::Ignore {
            return;
        }
        match observe(&path) {
            Some(seen) => {
                let entry = pending.entry(path).or_insert(Pending {
                    seen,
                    since: Instant::now(),
                });
                if entry.seen != seen {
                    *entry = Pending {
                        seen,
                        since: Instant::now(),
                    };
                }
            }
            None => {
                pending.remove(&path);
            }
        }
    };
    let rescan = |pending: &mut HashMap<PathBuf, Pending>| {
        if let Ok(dir) = std::fs::read_dir(&s.drop_dir) {
            for entry in dir.flatten() {
                consider(pending, entry.path());
            }
        }
    };
    rescan(&mut pending);
    let mut check = tokio::time::interval(s.settle / 4);
    let mut full = tokio::time::interval(s.rescan);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            Some(path) = rx.recv() => consider(&mut pending, path),
            _ = full.tick() => rescan(&mut pending),
            _ = check.tick() => {
                let now = Instant::now();
                let mut ready = Vec::new();
                pending.retain(|path, p| match observe(path) {
                    None => false,
                    Some(seen) if seen != p.seen => {
                        *p = Pending { seen, since: now };
                        true
                    }
                    Some(_) => {
                        if now.duration_since(p.since) >= s.settle {
                            ready.push(path.clone());
                        }
                        true
                    }
                });
                for path in ready {
                    if shutdown.is_cancelled() {
                        return Ok(());
                    }
                    match watcher.take_dropped_file(&path).await {
                        Ok(()) => {
                            pending.remove(&path);
                        }
                        Err(reason) => {
                            // NATS unavailable or similar: the file stays, and is tried again.
                            tracing::warn!(file = %path.display(), %reason, "will retry dropped file");
                            if let Some(p) = pending.get_mut(&path) {
                                p.since = Instant::now() + s.settle * 4;
                            }
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
    async fn take_dropped_file(&self, path: &Path) -> Result<(), String> {
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let source = PackageSource::DropFolder {
            file: file_name.clone(),
        };
        let name = match classify_file_name(&file_name) {
            NameVerdict::Ignore => return Ok(()),
            NameVerdict::Invalid(message) => {
                let reason = Rejection {
                    code: RejectCode::InvalidName,
                    message,
                };
                return self.reject_dropped(path, None, source, reason).await;
            }
            NameVerdict::Package(name) => name,
        };
        let limits = self.settings.limits.clone();
        let owned = path.to_path_buf();
        let inspected = match tokio::task::spawn_blocking(move || inspect(&owned, &limits)).await {
            Ok(Ok(i)) => i,
            Ok(Err(e)) => {
                return self
                    .reject_dropped(path, Some(&name), source, e.rejection())
                    .await;
            }
            Err(e) => return Err(format!("validation task failed: {e}")),
        };
        let object = names::archive_object(&name.app, &name.version, &inspected.blake3);
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| e.to_string())?;
        self.bus.incoming.upload_archive(&object, &mut file).await?;
        let detected = PackageDetected {
            app: name.app,
            version: name.version,
            object,
            size: inspected.size,
            blake3: inspected.blake3,
            source,
        };
        self.announce(&detected).await.map_err(|e| e.to_string())?;
        move_into(path, &self.settings.processed_dir(), None);
        Ok(())
    }

    async fn reject_dropped(
        &self,
        path: &Path,
        name: Option<&fleetcast_package::PackageName>,
        source: PackageSource,
        reason: Rejection,
    ) -> Result<(), String> {
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
            crate::Outcome::Retry(e) | crate::Outcome::RetryAfter(e, _) => Err(e),
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
