//! Turning a verified release into stored chunks and tree nodes. Blocking threads read the
//! archive, cut each file's uncompressed content into chunks and hash the whole file as they
//! go; the async side stores the chunks the store lacks, a bounded number at a time. The files
//! then make the release's tree (`fleetcast_events::tree`), which must have the very root the
//! signer signed; only then are its nodes stored, children before parents, the root last. So a
//! stored root means the whole release is stored, and a release whose root is stored needs no
//! archive at all.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::DirectGetErrorKind;
use fleetcast_events::VerifiedManifest;
use fleetcast_events::manifest::{FileEntry, TreeRoot};
use fleetcast_events::names::chunk_subject;
use fleetcast_events::patches::{self, PatchList};
use fleetcast_events::tree::{self, ChunkList, Hash32, NodeRef, TreeFile};
use fleetcast_events::v1::{RejectCode, Rejection};
use fleetcast_package::chunking::{self, ChunkId};
use fleetcast_package::{ArchiveError, ArchiveLimits, Entry, EntryKind, Package};
use fleetcast_runtime::{Bus, BusError};
use futures::StreamExt;
use futures::stream::FuturesUnordered;

/// Why a release was not stored.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The archive does not match its signed manifest, or cannot be read: refuse the release.
    #[error("{0}")]
    Rejected(Rejection),
    /// The release is not stored, and its caller fetched no archive.
    #[error("the release is not stored, but no archive was fetched")]
    NoArchive,
    /// A thread reading the archive ended without an answer.
    #[error("reader task failed: {0}")]
    Reader(#[from] tokio::task::JoinError),
    #[error("chunking thread panicked")]
    ChunkingPanicked,
    /// The hash the package gives a file is not one (never, from its own hasher).
    #[error("{path}: {source}")]
    FileHash {
        path: String,
        source: tree::TreeError,
    },
    /// The chunk store failed (whether that may pass: [`StoreError::is_transient`]).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl IngestError {
    /// The refusal of the release this is; `None` for a failure of this distributor or of
    /// the store, which is tried again.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            IngestError::Rejected(reason) => Some(reason),
            IngestError::NoArchive
            | IngestError::Reader(_)
            | IngestError::ChunkingPanicked
            | IngestError::FileHash { .. }
            | IngestError::Store(_) => None,
        }
    }
}

/// What went wrong with the chunk store, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer or refused the request (NATS unreachable, a cluster moving
    /// leaders, the stream full): it may work later.
    #[error("{what}: {reason}")]
    Unavailable { what: String, reason: String },
    /// Nothing is stored under that name (a base release's objects gone from the store).
    #[error("{what}: not in the store")]
    Missing { what: String },
    /// What the store holds under a name is not what the name says, or does not decode:
    /// reading it again gives the same.
    #[error("{what}: {reason}")]
    Corrupt { what: String, reason: String },
}

impl StoreError {
    /// Whether trying again may succeed: only when the store was unavailable.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    fn unavailable(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        StoreError::Unavailable {
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    fn corrupt(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        StoreError::Corrupt {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct IngestReport {
    pub files: u64,
    pub total_bytes: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    pub new_stored_bytes: u64,
    pub tree_nodes: u64,
    pub new_tree_nodes: u64,
}

/// Chunks known to be in the store are remembered, so re-ingesting shared content costs
/// hashing only. Bounded: past this many it starts over (the store itself is the truth).
const MAX_KNOWN: usize = 4_000_000;

/// The content-addressed store of chunks and tree nodes: one subject per app and object in the
/// chunks stream. What is known is known per app: an object stored for one app is stored again
/// for another, whose agents may read only their own apps' objects.
#[derive(Clone)]
pub struct ChunkStore {
    js: async_nats::jetstream::Context,
    chunks: async_nats::jetstream::stream::Stream,
    /// Per app, the objects known to be stored under its subjects.
    known: Arc<Mutex<HashMap<String, HashSet<ChunkId>>>>,
}

/// Chunks up to this size are compressed on the task that stores them.
const INLINE_COMPRESS: usize = 16 * 1024;

pub(crate) enum Stored {
    New(u64),
    Existing,
}

impl ChunkStore {
    /// The chunks stream of `bus` (which a service created).
    pub async fn bind(bus: &Bus) -> Result<Self, BusError> {
        Ok(ChunkStore {
            js: bus.js.clone(),
            chunks: bus.stream(fleetcast_events::names::CHUNKS_STREAM).await?,
            known: Arc::default(),
        })
    }

    /// Whether the release with this tree is stored already: its root is written last.
    pub async fn tree_stored(&self, app: &str, tree: &TreeRoot) -> Result<bool, StoreError> {
        let id = ChunkId::from_hex(&tree.root).map_err(|e| StoreError::corrupt("tree root", e))?;
        if self.is_known(app, &id) {
            return Ok(true);
        }
        match self
            .chunks
            .direct_get_last_for_subject(chunk_subject(app, &tree.root))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(false),
            Err(e) => Err(StoreError::unavailable(
                format!("checking tree root {}", tree.root),
                e,
            )),
        }
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

    /// A stored chunk or tree node of `app`, checked against its name, with its size as
    /// stored (what an agent pays to fetch it).
    pub async fn get(
        &self,
        app: &str,
        id: ChunkId,
        len: u32,
    ) -> Result<(Vec<u8>, u64), StoreError> {
        let what = || format!("chunk {id}");
        let message = match self
            .chunks
            .direct_get_last_for_subject(chunk_subject(app, &id.to_hex()))
            .await
        {
            Ok(message) => message,
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => {
                return Err(StoreError::Missing { what: what() });
            }
            Err(e) => return Err(StoreError::unavailable(what(), e)),
        };
        let chunk = chunking::verify(&id, len, &message.payload)
            .map_err(|e| StoreError::corrupt(what(), e))?;
        Ok((chunk.into_data(), message.payload.len() as u64))
    }

    /// The files of a stored release, every chunk list resolved, read from its tree in the
    /// store (each node checked against its name).
    pub async fn tree_files(
        &self,
        app: &str,
        root: &TreeRoot,
    ) -> Result<Vec<TreeFile>, StoreError> {
        let malformed = |e: tree::TreeError| StoreError::corrupt(format!("tree {}", root.root), e);
        let mut walk = tree::Walk::files(root.node().map_err(malformed)?, root.files);
        self.walk(app, &mut walk).await?;
        let mut files = walk.into_files(root.files).map_err(malformed)?;
        for file in &mut files {
            if let ChunkList::Tree {
                root: chunks,
                count,
            } = file.chunks
            {
                let mut walk = tree::Walk::chunks(chunks, count);
                self.walk(app, &mut walk).await?;
                file.chunks = ChunkList::Listed(walk.into_chunks().map_err(malformed)?);
            }
        }
        Ok(files)
    }

    async fn walk(&self, app: &str, walk: &mut tree::Walk) -> Result<(), StoreError> {
        while !walk.wanted().is_empty() {
            let wanted = walk.wanted().to_vec();
            // A batch at a time, in a plain loop (the service's tasks must stay `Send`).
            let mut nodes = Vec::with_capacity(wanted.len());
            for batch in wanted.chunks(16) {
                let mut inflight = futures::stream::FuturesOrdered::new();
                for r in batch {
                    inflight.push_back(self.get(app, ChunkId(r.hash.0), r.len));
                }
                while let Some(node) = inflight.next().await {
                    nodes.push(node?.0);
                }
            }
            walk.supply(&nodes)
                .map_err(|e| StoreError::corrupt("a tree node", e))?;
        }
        Ok(())
    }

    /// The patch list of the release with tree `root` (empty if none was made yet).
    pub async fn patch_list(&self, app: &str, root: &str) -> Result<PatchList, StoreError> {
        let what = || format!("the patch list of {root}");
        match self
            .chunks
            .direct_get_last_for_subject(chunk_subject(app, &patches::list_key(root)))
            .await
        {
            Ok(message) => {
                PatchList::decode(&message.payload).map_err(|e| StoreError::corrupt(what(), e))
            }
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(PatchList::default()),
            Err(e) => Err(StoreError::unavailable(what(), e)),
        }
    }

    /// Replaces the patch list of the release with tree `root` (one message per subject: the
    /// store keeps the last).
    pub async fn put_patch_list(
        &self,
        app: &str,
        root: &str,
        list: &PatchList,
    ) -> Result<(), StoreError> {
        let what = || format!("storing the patch list of {root}");
        let bytes = list.encode().map_err(|e| StoreError::corrupt(what(), e))?;
        self.js
            .publish(chunk_subject(app, &patches::list_key(root)), bytes.into())
            .await
            .map_err(|e| StoreError::unavailable(what(), e))?
            .await
            .map_err(|e| StoreError::unavailable(what(), e))?;
        Ok(())
    }

    /// Stores a chunk of `app` unless the store has it under the app's subject. The publish
    /// carries "expected last subject sequence 0", so when two distributors race on the same
    /// chunk the server keeps one.
    pub(crate) async fn store(
        &self,
        app: &str,
        id: ChunkId,
        data: Vec<u8>,
    ) -> Result<Stored, StoreError> {
        if self.is_known(app, &id) {
            return Ok(Stored::Existing);
        }
        let subject = chunk_subject(app, &id.to_hex());
        match self
            .chunks
            .direct_get_last_for_subject(subject.clone())
            .await
        {
            Ok(_) => {
                self.remember(app, id);
                return Ok(Stored::Existing);
            }
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => {}
            Err(e) => return Err(StoreError::unavailable(format!("checking chunk {id}"), e)),
        }
        // A small chunk (a small file, a tree node) compresses in microseconds: here, rather
        // than on a blocking thread whose hand-off costs more than the work (and whose many
        // threads each keep an allocator arena).
        let compressed = if data.len() <= INLINE_COMPRESS {
            chunking::encode_stored(&data)
        } else {
            tokio::task::spawn_blocking(move || chunking::encode_stored(&data))
                .await
                .map_err(|e| StoreError::unavailable(format!("compressing chunk {id}"), e))?
        }
        .map_err(|e| StoreError::corrupt(format!("compressing chunk {id}"), e))?;
        let len = compressed.len() as u64;
        let publish = PublishMessage::build()
            .payload(compressed.into())
            .expected_last_subject_sequence(0);
        let ack = self
            .js
            .send_publish(subject, publish)
            .await
            .map_err(|e| StoreError::unavailable(format!("storing chunk {id}"), e))?;
        match ack.await {
            Ok(_) => {
                self.remember(app, id);
                Ok(Stored::New(len))
            }
            Err(e) if matches!(e.kind(), PublishErrorKind::WrongLastSequence) => {
                self.remember(app, id);
                Ok(Stored::Existing)
            }
            Err(e) => Err(StoreError::unavailable(format!("storing chunk {id}"), e)),
        }
    }
}

struct Work {
    id: ChunkId,
    data: Vec<u8>,
}

fn mismatch(message: String) -> IngestError {
    IngestError::Rejected(Rejection {
        code: RejectCode::ManifestMismatch,
        message,
    })
}

/// Stores the release `manifest` signed, from `archive`, which must hold exactly the files
/// whose tree the manifest names. A release whose tree is stored already needs no archive.
pub async fn ingest(
    store: &ChunkStore,
    archive: Option<&Path>,
    manifest: &VerifiedManifest,
    limits: &ArchiveLimits,
    concurrency: usize,
) -> Result<IngestReport, IngestError> {
    let app = manifest.app.as_str();
    let signed = &manifest.tree;
    if store.tree_stored(app, signed).await? {
        return Ok(IngestReport {
            files: signed.files,
            total_bytes: signed.bytes,
            ..IngestReport::default()
        });
    }
    let archive = archive.ok_or(IngestError::NoArchive)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Work>(64);
    let (path, limits_owned) = (PathBuf::from(archive), limits.clone());
    let producer = tokio::task::spawn_blocking(move || produce(&path, &limits_owned, tx));
    let mut report = IngestReport::default();
    let stored = store_chunks(store, app, rx, concurrency, &mut report).await;
    let files = producer.await?;
    // The store's failure first: the readers stopped because of it.
    stored?;
    let files = files?;
    let built = tree::build(&files).map_err(|e| mismatch(e.to_string()))?;
    let ours = TreeRoot::of(&built, &files);
    drop(files);
    if ours != *signed {
        return Err(mismatch(format!(
            "the archive's files make tree {} ({} files, {} bytes), the signed manifest names {} ({} files, {} bytes)",
            ours.root, ours.files, ours.bytes, signed.root, signed.files, signed.bytes
        )));
    }
    report.files = ours.files;
    report.total_bytes = ours.bytes;
    store_tree(store, app, &built.nodes, concurrency, &mut report).await?;
    Ok(report)
}

/// Stores the chunks the readers send, `concurrency` at a time, counting them in `report`.
/// On the store's first failure the readers are stopped (`rx` closed), what is in flight is
/// finished, and the failure returned.
async fn store_chunks(
    store: &ChunkStore,
    app: &str,
    mut rx: tokio::sync::mpsc::Receiver<Work>,
    concurrency: usize,
    report: &mut IngestReport,
) -> Result<(), StoreError> {
    let mut inflight = FuturesUnordered::new();
    let mut failure = None;
    let mut done = false;
    while !(done && inflight.is_empty()) {
        tokio::select! {
            Some(result) = inflight.next(), if !inflight.is_empty() => match result {
                Ok(Stored::New(bytes)) => {
                    report.new_chunks += 1;
                    report.new_stored_bytes += bytes;
                }
                Ok(Stored::Existing) => {}
                Err(e) => {
                    failure.get_or_insert(e);
                    rx.close();
                }
            },
            work = rx.recv(), if !done && inflight.len() < concurrency => match work {
                Some(w) => {
                    report.chunks += 1;
                    inflight.push(store.store(app, w.id, w.data));
                }
                None => done = true,
            },
        }
    }
    failure.map_or(Ok(()), Err)
}

/// Stores a release's tree nodes (children before parents, the root last), counting them in
/// `report`: so a stored root means the whole release is stored.
async fn store_tree(
    store: &ChunkStore,
    app: &str,
    nodes: &[(NodeRef, Vec<u8>)],
    concurrency: usize,
    report: &mut IngestReport,
) -> Result<(), IngestError> {
    // Children before parents, one at a time per level would be slow: every node of a level is
    // independent, so they go in parallel, and the root, last in the list, alone at the end.
    let Some(((root, root_bytes), below)) = nodes.split_last() else {
        return Err(mismatch("empty tree".into()));
    };
    report.tree_nodes = nodes.len() as u64;
    let mut pending = below.iter();
    let mut inflight = FuturesUnordered::new();
    loop {
        while inflight.len() < concurrency {
            let Some((r, bytes)) = pending.next() else {
                break;
            };
            inflight.push(store.store(app, ChunkId(r.hash.0), bytes.clone()));
        }
        match inflight.next().await {
            Some(Ok(Stored::New(_))) => report.new_tree_nodes += 1,
            Some(Ok(Stored::Existing)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => break,
        }
    }
    if let Stored::New(_) = store
        .store(app, ChunkId(root.hash.0), root_bytes.clone())
        .await?
    {
        report.new_tree_nodes += 1;
    }
    Ok(())
}

/// What a chunking worker keeps of a file it read. Plain data, no allocation of its own: see
/// [`produce`].
struct ReadFile {
    /// Index in the package's entries (its path is there).
    entry: usize,
    mode: u32,
    size: u64,
    blake3: Hash32,
    /// Its chunks, in its worker's list: none for a file that is one chunk (on the wire such a
    /// file lists no chunks: its chunk is the file itself, docs/tree.md).
    chunks: std::ops::Range<usize>,
}

/// One worker's files, and the chunks of those that are more than one, in order.
struct Share {
    files: Vec<ReadFile>,
    chunks: Vec<(ChunkId, u32)>,
}

/// The blocking half: reads every file of the archive on a few threads, feeds their chunks to
/// `tx`, and returns the files in path order.
///
/// Memory: reading each zip entry allocates, then frees, a ~47 KiB inflate state. A small
/// allocation that outlives its file (its path, its hash as text), made in between, splits
/// that freed block, which is then too small for the next file's state: the heap grew by up
/// to one state per file and held it (measured, `ops/bench many`, 200,000 files: 60 MiB of
/// such holes per worker's arena, and 1.4–2.4 GiB when a worker shared the main arena, whose
/// heap is not capped). So the workers keep nothing of a file but a fixed-size record in a
/// list allocated once, and the files' text is made here, once every worker is done, in path
/// order, with nothing freed in between.
fn produce(
    path: &Path,
    limits: &ArchiveLimits,
    tx: tokio::sync::mpsc::Sender<Work>,
) -> Result<Vec<TreeFile>, IngestError> {
    let package = Package::open(path, limits).map_err(|e| IngestError::Rejected(e.rejection()))?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (shares, links) = plan_reading(package.entries(), workers);
    // None: the store side stopped, and reports why.
    let Some(read) = read_shares(&package, shares, tx)? else {
        return Ok(Vec::new());
    };
    Ok(in_path_order(package.entries(), &read, links))
}

/// Which worker reads which file (index in `entries`, mode), and the entries that are
/// symbolic links (few: they join the files read, in path order, afterwards).
///
/// Files are spread over up to `workers` workers, largest first, each to the least loaded:
/// inflating, chunking and hashing are what bound ingest speed.
fn plan_reading(entries: &[Entry], workers: usize) -> (Vec<Vec<(usize, u32)>>, Vec<usize>) {
    let mut plan: Vec<(usize, u32)> = Vec::new();
    let mut links: Vec<usize> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        match &entry.kind {
            EntryKind::Dir => {}
            EntryKind::Symlink { .. } => links.push(i),
            EntryKind::File { mode } => plan.push((i, *mode)),
        }
    }
    let workers = workers.min(plan.len()).max(1);
    let mut shares: Vec<(u64, Vec<(usize, u32)>)> = vec![(0, Vec::new()); workers];
    plan.sort_by_key(|(i, _)| std::cmp::Reverse(entries[*i].size));
    for item in plan {
        if let Some(least) = shares.iter_mut().min_by_key(|(load, _)| *load) {
            least.0 += entries[item.0].size;
            least.1.push(item);
        }
    }
    let shares = shares.into_iter().map(|(_, share)| share).collect();
    (shares, links)
}

/// Reads each share on a thread of its own, with its own reader of the archive (sharing its
/// parsed central directory), feeding the chunks to `tx`. `None` if the store side stopped
/// taking chunks.
fn read_shares(
    package: &Package,
    shares: Vec<Vec<(usize, u32)>>,
    tx: tokio::sync::mpsc::Sender<Work>,
) -> Result<Option<Vec<Share>>, IngestError> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = shares
            .into_iter()
            .map(|share| {
                let tx = tx.clone();
                let reader = package.reader();
                scope.spawn(move || chunk_files(reader, &share, &tx))
            })
            .collect();
        drop(tx);
        let mut read = Vec::with_capacity(handles.len());
        for handle in handles {
            match handle.join() {
                Ok(Ok(Some(share))) => read.push(share),
                Ok(Ok(None)) => return Ok(None),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(IngestError::ChunkingPanicked),
            }
        }
        Ok(Some(read))
    })
}

/// Every file read and every link of `entries`, in path order: the files of the release's
/// tree. Their text (paths, hashes) is made here, once every worker is done (see [`produce`]).
fn in_path_order(entries: &[Entry], read: &[Share], links: Vec<usize>) -> Vec<TreeFile> {
    // Every file and link, in path order: (entry, file's share and place in it; none for a link).
    let mut order: Vec<(usize, Option<(usize, usize)>)> =
        Vec::with_capacity(read.iter().map(|s| s.files.len()).sum::<usize>() + links.len());
    for (s, share) in read.iter().enumerate() {
        order.extend(
            share
                .files
                .iter()
                .enumerate()
                .map(|(k, f)| (f.entry, Some((s, k)))),
        );
    }
    order.extend(links.into_iter().map(|i| (i, None)));
    // Paths are unique (the package refuses duplicates): an unstable sort, in place.
    order.sort_unstable_by(|a, b| entries[a.0].path.cmp(&entries[b.0].path));
    let mut files = Vec::with_capacity(order.len());
    for (i, place) in order {
        let entry = &entries[i];
        let file = match (place, &entry.kind) {
            (Some((s, k)), _) => {
                let (share, read) = (&read[s], &read[s].files[k]);
                TreeFile {
                    entry: FileEntry {
                        path: entry.path.clone(),
                        mode: read.mode,
                        size: read.size,
                        blake3: read.blake3.to_hex(),
                        link: None,
                    },
                    chunks: ChunkList::Listed(
                        share.chunks[read.chunks.clone()]
                            .iter()
                            .map(|(id, len)| chunking::chunk_ref(id, *len as usize))
                            .collect(),
                    ),
                }
            }
            (None, EntryKind::Symlink { target }) => {
                TreeFile::link(entry.path.clone(), target.clone())
            }
            (None, _) => continue,
        };
        files.push(file);
    }
    files
}

/// One worker's share of the files (index in the entries, mode); `None` if the store side
/// stopped taking chunks.
fn chunk_files(
    mut package: Package,
    share: &[(usize, u32)],
    tx: &tokio::sync::mpsc::Sender<Work>,
) -> Result<Option<Share>, IngestError> {
    let rejected = |e: ArchiveError| {
        IngestError::Rejected(Rejection {
            code: RejectCode::CorruptArchive,
            message: e.to_string(),
        })
    };
    // The entries, from a second reader: `package` reads while they are borrowed.
    let index = package.reader();
    let mut out = Share {
        files: Vec::with_capacity(share.len()),
        chunks: Vec::new(),
    };
    for &(i, mode) in share {
        let Some(entry) = index.entries().get(i) else {
            continue;
        };
        let start = out.chunks.len();
        let mut stopped = false;
        let (file, _) = package
            .chunk_entry(entry, mode, |id, data| {
                out.chunks.push((id, data.len() as u32));
                if !stopped && tx.blocking_send(Work { id, data }).is_err() {
                    stopped = true;
                }
                Ok(())
            })
            .map_err(rejected)?;
        if stopped {
            return Ok(None);
        }
        let blake3 = Hash32::from_hex(&file.blake3).map_err(|source| IngestError::FileHash {
            path: entry.path.clone(),
            source,
        })?;
        // A file that is one chunk keeps no list (see `ReadFile::chunks`): 200,000 small files
        // hold 200,000 fewer lists.
        if out.chunks.len() == start + 1 && out.chunks[start].0.0 == blake3.0 {
            out.chunks.truncate(start);
        }
        out.files.push(ReadFile {
            entry: i,
            mode,
            size: file.size,
            blake3,
            chunks: start..out.chunks.len(),
        });
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fleetcast_runtime::NatsSettings;
    use tokio_util::sync::CancellationToken;

    use super::*;

    #[test]
    fn files_are_spread_largest_first_to_the_least_loaded_worker_links_kept_apart() {
        let entry = |index: usize, size: u64, kind: EntryKind| Entry {
            index,
            path: format!("f{index}"),
            kind,
            size,
        };
        let file = |index, size| entry(index, size, EntryKind::File { mode: 0o644 });
        let entries = [
            file(0, 10),
            entry(1, 0, EntryKind::Dir),
            file(1, 70),
            entry(
                3,
                0,
                EntryKind::Symlink {
                    target: "f0".into(),
                },
            ),
            file(4, 40),
            file(5, 30),
        ];
        let (shares, links) = plan_reading(&entries, 2);
        assert_eq!(links, [3]);
        // 70 to the first; 40, 30 to the second (70 ≥ 40 + 30); 10 to the first again.
        let sizes: Vec<Vec<u64>> = shares
            .iter()
            .map(|share| share.iter().map(|(i, _)| entries[*i].size).collect())
            .collect();
        assert_eq!(sizes, [vec![70, 10], vec![40, 30]]);
        // Never more workers than files, and one even for none.
        assert_eq!(plan_reading(&entries, 64).0.len(), 4);
        assert_eq!(plan_reading(&[], 8).0.len(), 1);
    }

    /// What decides whether a patch job is tried again: a chunk missing from the store or not
    /// what its name says will be the same next time; a store that does not answer may not.
    #[tokio::test]
    async fn a_missing_or_corrupt_chunk_is_not_worth_another_try_an_absent_store_is() {
        let server = fleetcast_harness::NatsServer::start().await.expect("nats");
        let settings = NatsSettings {
            url: server.url(),
            insecure_dev: true,
            request_timeout: Duration::from_millis(500),
            ..NatsSettings::default()
        };
        let bus = Bus::connect(&settings, "test", &CancellationToken::new())
            .await
            .expect("bus");
        let store = ChunkStore::bind(&bus).await.expect("chunk store");
        let id = ChunkId::of(b"hello");

        let missing = store.get("app", id, 5).await.expect_err("missing");
        assert!(matches!(missing, StoreError::Missing { .. }), "{missing}");
        assert!(!missing.is_transient());

        // Something else stored under its name.
        let other = chunking::encode_stored(b"other").expect("encode");
        bus.js
            .publish(chunk_subject("app", &id.to_hex()), other.into())
            .await
            .expect("publish")
            .await
            .expect("ack");
        let corrupt = store.get("app", id, 5).await.expect_err("corrupt");
        assert!(matches!(corrupt, StoreError::Corrupt { .. }), "{corrupt}");
        assert!(!corrupt.is_transient());

        drop(server);
        let gone = store.get("app", id, 5).await.expect_err("no store");
        assert!(gone.is_transient(), "{gone}");
        assert!(
            gone.to_string().starts_with(&format!("chunk {id}")),
            "{gone}"
        );
    }
}
