//! Turning a verified release into stored chunks. A blocking thread reads the archive, checks
//! every entry against the signed manifest, and cuts each file's uncompressed content into
//! chunks, hashing the whole file as it goes; the async side stores the chunks the store lacks,
//! a bounded number at a time, and builds the chunk index.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::DirectGetErrorKind;
use fleetcast_events::manifest::FileEntry;
use fleetcast_events::names::{CHUNK_SUBJECT_PREFIX, chunk_subject};
use fleetcast_events::v1::{ChunkIndex, ChunkRef, FileChunks, RejectCode, Rejection};
use fleetcast_events::{Encoding, VerifiedManifest};
use fleetcast_package::chunking::{self, ChunkId, chunk_ref};
use fleetcast_package::{ArchiveLimits, EntryKind, Package};
use fleetcast_runtime::Bus;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

#[derive(Debug)]
pub enum IngestError {
    /// The archive does not match its signed manifest, or cannot be read: refuse the release.
    Rejected(Rejection),
    /// NATS or the local disk failed: try again later.
    Transient(String),
}

#[derive(Debug, Clone)]
pub struct IngestReport {
    pub index: ChunkIndex,
    pub files: u64,
    pub total_bytes: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    pub new_stored_bytes: u64,
}

/// Chunks known to be in the store are remembered, so re-ingesting shared content costs
/// hashing only. Bounded: past this many it starts over (the store itself is the truth).
const MAX_KNOWN: usize = 4_000_000;

/// The content-addressed chunk store: one subject per app and chunk in the chunks stream. What
/// is known is known per app: a chunk (or file) stored for one app is stored again for another,
/// whose agents may read only their own apps' chunks.
#[derive(Clone)]
pub struct ChunkStore {
    bus: Bus,
    /// Per app, the chunks known to be stored under its subjects.
    known: Arc<Mutex<HashMap<String, HashSet<ChunkId>>>>,
    /// Chunk indexes already read into `known`.
    learned: Arc<Mutex<HashSet<String>>>,
    /// Files stored before, by app and BLAKE3: their chunk lists, so an unchanged file is never
    /// read again (and a release whose files are all known needs no archive at all).
    files: Arc<Mutex<HashMap<(String, String), KnownFile>>>,
}

#[derive(Clone)]
struct KnownFile {
    size: u64,
    chunks: Vec<ChunkRef>,
}

/// Bound on remembered files; past it the map starts over.
const MAX_KNOWN_FILES: usize = 200_000;

enum Stored {
    New(u64),
    Existing,
}

impl ChunkStore {
    pub fn new(bus: Bus) -> Self {
        ChunkStore {
            bus,
            known: Arc::default(),
            learned: Arc::default(),
            files: Arc::default(),
        }
    }

    /// Reads the chunk indexes of the app's stored releases into the known set, so a fresh
    /// distributor re-ingesting mostly unchanged content does not ask the store about every
    /// chunk. Sound because an index is written only after all its chunks were stored, and
    /// chunks are never deleted. Best effort: on any error the store is asked instead.
    pub async fn learn_app(&self, app: &str) {
        let Ok(mut keys) = self.bus.index.keys().await else {
            return;
        };
        let prefix = format!("{app}.");
        while let Some(Ok(key)) = keys.next().await {
            let seen = self.learned.lock().map_or(true, |l| l.contains(&key));
            if !key.starts_with(&prefix) || seen {
                continue;
            }
            let Ok(Some(bytes)) = self.bus.index.get(&key).await else {
                continue;
            };
            let Ok(mut index) = Encoding::MsgPack.decode::<ChunkIndex>(&bytes) else {
                continue;
            };
            // Stored before chunks were per app: moved under the app's subjects first, else
            // its chunks are not known.
            if !index.per_app {
                match self.move_to_app(&key, &index).await {
                    Ok(moved) => index = moved,
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "release not moved to per-app chunks yet");
                        continue;
                    }
                }
            }
            for chunk in index.files.iter().flat_map(|f| &f.chunks) {
                if let Ok(id) = ChunkId::from_hex(&chunk.id) {
                    self.remember(app, id);
                }
            }
            self.remember_files(&index);
            if let Ok(mut learned) = self.learned.lock() {
                learned.insert(key);
            }
        }
    }

    /// Every release stored before chunks were per app, moved under its app's subjects (see
    /// [`ChunkStore::move_to_app`]); what cannot be moved now is moved when the app's next
    /// release is stored. Returns how many releases were moved.
    pub async fn move_all_to_apps(&self) -> Result<u64, String> {
        let mut keys = self.bus.index.keys().await.map_err(|e| e.to_string())?;
        let mut moved = 0;
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| e.to_string())?;
            let Ok(Some(bytes)) = self.bus.index.get(&key).await else {
                continue;
            };
            let Ok(index) = Encoding::MsgPack.decode::<ChunkIndex>(&bytes) else {
                continue;
            };
            if !index.per_app {
                self.move_to_app(&key, &index).await?;
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// Upgrade from chunks stored once for every app (`fleetcast.v1.chunk.<hash>`): copies a
    /// release's chunks under its app's subjects (as stored, still compressed; each at most
    /// once, as a new chunk is) and rewrites its index as per app. Agents may read only their
    /// apps' subjects, so until then they cannot install the release. The old subjects stay
    /// until an operator purges them.
    async fn move_to_app(&self, key: &str, index: &ChunkIndex) -> Result<ChunkIndex, String> {
        let app = index.app.as_str();
        let ids: HashSet<&str> = index
            .files
            .iter()
            .flat_map(|f| f.chunks.iter().map(|c| c.id.as_str()))
            .collect();
        for hex in ids {
            let subject = chunk_subject(app, hex);
            match self.bus.chunks.direct_get_last_for_subject(&subject).await {
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => {}
                Err(e) => return Err(format!("checking chunk {hex}: {e}")),
            }
            let old = format!("{CHUNK_SUBJECT_PREFIX}{hex}");
            let stored = self
                .bus
                .chunks
                .direct_get_last_for_subject(&old)
                .await
                .map_err(|e| format!("reading chunk {hex}: {e}"))?;
            let publish = PublishMessage::build()
                .payload(stored.payload)
                .expected_last_subject_sequence(0);
            let ack = self
                .bus
                .js
                .send_publish(subject, publish)
                .await
                .map_err(|e| format!("storing chunk {hex}: {e}"))?;
            match ack.await {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), PublishErrorKind::WrongLastSequence) => {}
                Err(e) => return Err(format!("storing chunk {hex}: {e}")),
            }
        }
        let moved = ChunkIndex {
            per_app: true,
            ..index.clone()
        };
        let bytes = Encoding::MsgPack
            .encode(&moved)
            .map_err(|e| format!("encoding index {key}: {e}"))?;
        self.bus
            .index
            .put(key, bytes.into())
            .await
            .map_err(|e| format!("writing index {key}: {e}"))?;
        tracing::info!(%key, "release moved to per-app chunks");
        Ok(moved)
    }

    /// Records the files of a stored release (those whose index carries their hash), for its app.
    pub fn remember_files(&self, index: &ChunkIndex) {
        if !index.per_app {
            return;
        }
        let Ok(mut files) = self.files.lock() else {
            return;
        };
        if files.len() >= MAX_KNOWN_FILES {
            files.clear();
        }
        for f in &index.files {
            if let Some(hash) = &f.blake3 {
                let size = f.chunks.iter().map(|c| u64::from(c.len)).sum();
                files.insert(
                    (index.app.clone(), hash.clone()),
                    KnownFile {
                        size,
                        chunks: f.chunks.clone(),
                    },
                );
            }
        }
    }

    /// The chunk list of a file of `app` stored before with this hash and size.
    fn known_file(&self, app: &str, blake3: &str, size: u64) -> Option<Vec<ChunkRef>> {
        let files = self.files.lock().ok()?;
        files
            .get(&(app.to_string(), blake3.to_string()))
            .filter(|f| f.size == size)
            .map(|f| f.chunks.clone())
    }

    /// Whether ingesting `manifest` needs its archive: false when every file is known.
    pub fn needs_archive(&self, manifest: &VerifiedManifest) -> bool {
        manifest.files.iter().any(|f| {
            f.link.is_none() && self.known_file(&manifest.app, &f.blake3, f.size).is_none()
        })
    }

    fn is_known(&self, app: &str, id: &ChunkId) -> bool {
        self.known
            .lock()
            .is_ok_and(|k| k.get(app).is_some_and(|ids| ids.contains(id)))
    }

    fn remember(&self, app: &str, id: ChunkId) {
        if let Ok(mut known) = self.known.lock() {
            if known.values().map(HashSet::len).sum::<usize>() >= MAX_KNOWN {
                known.clear();
            }
            known.entry(app.to_string()).or_default().insert(id);
        }
    }

    /// Stores a chunk of `app` unless the store has it under the app's subject. The publish
    /// carries "expected last subject sequence 0", so when two distributors race on the same
    /// chunk the server keeps one.
    async fn store(&self, app: &str, id: ChunkId, data: Vec<u8>) -> Result<Stored, String> {
        if self.is_known(app, &id) {
            return Ok(Stored::Existing);
        }
        let subject = chunk_subject(app, &id.to_hex());
        match self
            .bus
            .chunks
            .direct_get_last_for_subject(subject.clone())
            .await
        {
            Ok(_) => {
                self.remember(app, id);
                return Ok(Stored::Existing);
            }
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => {}
            Err(e) => return Err(format!("checking chunk {id}: {e}")),
        }
        let compressed = tokio::task::spawn_blocking(move || chunking::encode_stored(&data))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("compressing chunk {id}: {e}"))?;
        let len = compressed.len() as u64;
        let publish = PublishMessage::build()
            .payload(compressed.into())
            .expected_last_subject_sequence(0);
        let ack = self
            .bus
            .js
            .send_publish(subject, publish)
            .await
            .map_err(|e| format!("storing chunk {id}: {e}"))?;
        match ack.await {
            Ok(_) => {
                self.remember(app, id);
                Ok(Stored::New(len))
            }
            Err(e) if matches!(e.kind(), PublishErrorKind::WrongLastSequence) => {
                self.remember(app, id);
                Ok(Stored::Existing)
            }
            Err(e) => Err(format!("storing chunk {id}: {e}")),
        }
    }
}

struct Work {
    file: usize,
    id: ChunkId,
    data: Vec<u8>,
}

fn mismatch(message: String) -> IngestError {
    IngestError::Rejected(Rejection {
        code: RejectCode::ManifestMismatch,
        message,
    })
}

/// Chunks and stores every file of `manifest` that was not stored before. `archive` (which must
/// match the manifest exactly) is needed only when some file is new.
pub async fn ingest(
    store: &ChunkStore,
    archive: Option<&Path>,
    manifest: &VerifiedManifest,
    limits: &ArchiveLimits,
    concurrency: usize,
) -> Result<IngestReport, IngestError> {
    let files = manifest.files.clone();
    let reuse: Vec<Option<Vec<ChunkRef>>> = files
        .iter()
        .map(|f| {
            if f.link.is_some() {
                None
            } else {
                store.known_file(&manifest.app, &f.blake3, f.size)
            }
        })
        .collect();
    let mut chunks = reuse.iter().flatten().map(|c| c.len() as u64).sum::<u64>();
    let mut index: Vec<FileChunks> = files
        .iter()
        .zip(&reuse)
        .map(|(f, known)| FileChunks {
            path: f.path.clone(),
            blake3: f.link.is_none().then(|| f.blake3.clone()),
            chunks: known.clone().unwrap_or_default(),
        })
        .collect();
    let skip: Vec<bool> = reuse.iter().map(Option::is_some).collect();
    let needed = files.iter().zip(&skip).any(|(f, s)| f.link.is_none() && !s);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Work>(64);
    let producer = match (needed, archive) {
        (false, _) => {
            drop(tx);
            None
        }
        (true, None) => {
            return Err(IngestError::Transient(
                "some files are new, but no archive was fetched".into(),
            ));
        }
        (true, Some(archive)) => {
            let (path, limits_owned) = (PathBuf::from(archive), limits.clone());
            Some(tokio::task::spawn_blocking(move || {
                produce(&path, &files, &skip, &limits_owned, tx)
            }))
        }
    };

    let mut inflight = FuturesUnordered::new();
    let (mut new_chunks, mut new_stored_bytes) = (0u64, 0u64);
    let mut failure = None;
    let mut done = false;
    while !(done && inflight.is_empty()) {
        tokio::select! {
            Some(result) = inflight.next(), if !inflight.is_empty() => match result {
                Ok(Stored::New(bytes)) => {
                    new_chunks += 1;
                    new_stored_bytes += bytes;
                }
                Ok(Stored::Existing) => {}
                Err(e) => {
                    failure.get_or_insert(e);
                    rx.close(); // stop the reader; finish what is in flight
                }
            },
            work = rx.recv(), if !done && inflight.len() < concurrency => match work {
                Some(w) => {
                    chunks += 1;
                    index[w.file].chunks.push(chunk_ref(&w.id, w.data.len()));
                    inflight.push(store.store(&manifest.app, w.id, w.data));
                }
                None => done = true,
            },
        }
    }
    let produced = match producer {
        Some(p) => p
            .await
            .map_err(|e| IngestError::Transient(format!("reader task failed: {e}")))?,
        None => Ok(()),
    };
    if let Some(e) = failure {
        return Err(IngestError::Transient(e));
    }
    produced?;
    let total_bytes = manifest.files.iter().map(|f| f.size).sum();
    Ok(IngestReport {
        index: ChunkIndex {
            app: manifest.app.clone(),
            version: manifest.version.clone(),
            files: index,
            per_app: true,
        },
        files: manifest.files.len() as u64,
        total_bytes,
        chunks,
        new_chunks,
        new_stored_bytes,
    })
}

/// The blocking half: checks the archive against the manifest and feeds chunks to `tx`.
fn produce(
    path: &Path,
    files: &[FileEntry],
    skip: &[bool],
    limits: &ArchiveLimits,
    tx: tokio::sync::mpsc::Sender<Work>,
) -> Result<(), IngestError> {
    let package = Package::open(path, limits).map_err(|e| IngestError::Rejected(e.rejection()))?;
    let entries: HashMap<String, (usize, EntryKind, u64)> = package
        .entries()
        .iter()
        .filter(|e| !matches!(e.kind, EntryKind::Dir))
        .map(|e| (e.path.clone(), (e.index, e.kind.clone(), e.size)))
        .collect();
    if entries.len() != files.len() {
        return Err(mismatch(format!(
            "archive has {} files, the signed manifest {}",
            entries.len(),
            files.len()
        )));
    }
    let mut plan: Vec<(usize, usize)> = Vec::with_capacity(files.len());
    for (i, file) in files.iter().enumerate() {
        let Some((index, kind, size)) = entries.get(&file.path) else {
            return Err(mismatch(format!(
                "{} is in the signed manifest but not in the archive",
                file.path
            )));
        };
        match kind {
            EntryKind::Symlink { target } if file.link.as_deref() == Some(target.as_str()) => {}
            EntryKind::File { mode }
                if file.link.is_none() && *mode == file.mode && *size == file.size =>
            {
                // Known files were checked for kind, mode and size above; their content is
                // already stored under the manifest's hash.
                if !skip[i] {
                    plan.push((i, *index))
                }
            }
            _ => {
                return Err(mismatch(format!(
                    "{} differs from the signed manifest (kind, mode, size or link)",
                    file.path
                )));
            }
        }
    }
    // Files are spread over the cores, largest first, each worker with its own reader of the
    // archive: inflating, chunking and hashing are what bound re-ingest speed.
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(plan.len())
        .max(1);
    let mut shares: Vec<(u64, Vec<(usize, usize)>)> = vec![(0, Vec::new()); workers];
    plan.sort_by_key(|(i, _)| std::cmp::Reverse(files[*i].size));
    for item in plan {
        if let Some(least) = shares.iter_mut().min_by_key(|(load, _)| *load) {
            least.0 += files[item.0].size;
            least.1.push(item);
        }
    }
    drop(package);
    std::thread::scope(|scope| {
        let handles: Vec<_> = shares
            .into_iter()
            .map(|(_, share)| {
                let tx = tx.clone();
                scope.spawn(move || chunk_files(path, files, limits, &share, &tx))
            })
            .collect();
        drop(tx);
        let mut result = Ok(());
        for handle in handles {
            let outcome = handle
                .join()
                .unwrap_or_else(|_| Err(IngestError::Transient("chunking thread panicked".into())));
            if result.is_ok() {
                result = outcome;
            }
        }
        result
    })
}

/// One worker's share of the files: `(manifest index, zip index)` pairs.
fn chunk_files(
    path: &Path,
    files: &[FileEntry],
    limits: &ArchiveLimits,
    share: &[(usize, usize)],
    tx: &tokio::sync::mpsc::Sender<Work>,
) -> Result<(), IngestError> {
    if share.is_empty() {
        return Ok(());
    }
    let mut package =
        Package::open(path, limits).map_err(|e| IngestError::Rejected(e.rejection()))?;
    for &(i, zip_index) in share {
        let file = &files[i];
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let reader = package
            .entry_reader(zip_index)
            .map_err(|e| IngestError::Rejected(e.rejection()))?;
        for chunk in chunking::chunks(reader) {
            let (id, data) = chunk.map_err(|e| {
                IngestError::Rejected(Rejection {
                    code: RejectCode::CorruptArchive,
                    message: format!("{}: {e}", file.path),
                })
            })?;
            hasher.update(&data);
            size += data.len() as u64;
            if tx.blocking_send(Work { file: i, id, data }).is_err() {
                return Ok(()); // the store side stopped and reports why
            }
        }
        if size != file.size || hasher.finalize().to_hex().as_str() != file.blake3 {
            return Err(mismatch(format!(
                "{} content does not match its signed hash",
                file.path
            )));
        }
    }
    Ok(())
}
