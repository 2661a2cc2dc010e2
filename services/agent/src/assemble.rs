//! Builds `versions/<v>.partial/` from a release's files (read from its signed tree,
//! `release_tree.rs`): unchanged files are hard links to an installed version; chunks already on
//! the host (in installed versions, or written by an interrupted attempt) are reused, the rest
//! fetched with bounded concurrency; every chunk is verified against its name before it is
//! written, every file against the signed manifest before the folder is renamed to
//! `versions/<v>/`. Memory stays at about `concurrency` chunks.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleetcast_events::patches::{self, PatchList};
use fleetcast_events::tree::{ChunkList, TreeFile};
use fleetcast_events::v1::ChunkRef;
use fleetcast_package::chunking::{self, ChunkError, ChunkId, MAX_CHUNK, VerifiedChunk};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use semver::Version;

use crate::install::{InstallRoot, sync_dir};

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("the release's tree cannot be installed: {0}")]
    BadTree(String),
    #[error("refused a chunk: {0}")]
    Chunk(#[from] ChunkError),
    #[error("cannot fetch chunk {id}: {reason}")]
    Fetch { id: String, reason: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} does not match the signed manifest after assembly")]
    FileMismatch(String),
}

impl AssembleError {
    /// Worth trying again later (the store, the network, a disk error that may pass), as
    /// opposed to bad data or a name this host's filesystem will never take: retrying those
    /// would leave the host "switching" for ever and its ring waiting; refused, they count as
    /// the ring's failures.
    pub fn is_transient(&self) -> bool {
        match self {
            AssembleError::Fetch { .. } => true,
            AssembleError::Io { source, .. } => !is_permanent_io(source),
            _ => false,
        }
    }
}

/// A file-system refusal that the same package will meet again on every attempt: a name too
/// long or not valid for this filesystem (`ENAMETOOLONG`, `EILSEQ`), a name that is a file
/// where a folder must be or the reverse (`ENOTDIR`, `EISDIR`). A full disk is not among them:
/// it may be cleaned up.
fn is_permanent_io(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::InvalidFilename | io::ErrorKind::NotADirectory | io::ErrorKind::IsADirectory
    ) || e.raw_os_error() == Some(libc::EILSEQ)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AssembleError + '_ {
    move |source| AssembleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A chunk from somewhere else, verified, with the bytes it cost to transfer.
pub struct Fetched {
    pub chunk: VerifiedChunk,
    pub wire_bytes: u64,
}

/// Where missing chunks come from.
/// Shared by the jobs of one assembly (a fetch several files wait on), which runs on the
/// agent's multi-threaded runtime: `Sync`, with `Send` fetches.
pub trait ChunkSource: Sync {
    fn fetch(
        &self,
        id: &ChunkId,
        len: u32,
    ) -> impl Future<Output = Result<Fetched, AssembleError>> + Send;

    /// The binary patches listed for the release whose tree is `root` (hex), with the bytes
    /// the list cost; `None` when there is none (or it cannot be read: patches only save
    /// bytes, chunks always work).
    fn patch_list(&self, root: &str) -> impl Future<Output = Option<(PatchList, u64)>> + Send {
        let _ = root;
        async { None }
    }
}

/// The chunk store: direct get on the chunk's own subject (under its app), so no consumer is
/// created per fetch and the agent's credential needs only its apps' chunk subjects.
pub struct NatsChunks {
    pub chunks: fleetcast_runtime::agent_bus::DirectChunks,
    pub app: fleetcast_events::AppName,
}

impl ChunkSource for NatsChunks {
    async fn fetch(&self, id: &ChunkId, len: u32) -> Result<Fetched, AssembleError> {
        let hex = id.to_hex();
        let message = self
            .chunks
            .get(&self.app, &hex)
            .await
            .map_err(|e| AssembleError::Fetch {
                id: hex,
                reason: e.to_string(),
            })?;
        let chunk = chunking::verify(id, len, &message.payload)?;
        Ok(Fetched {
            chunk,
            wire_bytes: message.payload.len() as u64,
        })
    }

    async fn patch_list(&self, root: &str) -> Option<(PatchList, u64)> {
        let message = match self.chunks.get(&self.app, &patches::list_key(root)).await {
            Ok(m) => m,
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {
                return None;
            }
            Err(e) => {
                tracing::info!(error = %e, "patch list not read: chunks only");
                return None;
            }
        };
        let wire = message.payload.len() as u64;
        match PatchList::decode(&message.payload) {
            Ok(list) => Some((list, wire)),
            Err(e) => {
                tracing::warn!(error = %e, "patch list refused: chunks only");
                None
            }
        }
    }
}

/// Chunks present in installed versions: id → (file, offset, length), from their trees; and
/// their whole files by content hash.
#[derive(Default)]
pub struct LocalChunks {
    places: HashMap<ChunkId, (PathBuf, u64, u32)>,
    files: HashMap<String, PathBuf>,
}

impl LocalChunks {
    /// Whether no installed version is known.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Learns the chunks of an installed version from its folder and its files.
    pub fn add_version(&mut self, dir: &Path, files: &[TreeFile]) {
        for file in files.iter().filter(|f| f.entry.link.is_none()) {
            let path = dir.join(&file.entry.path);
            self.files
                .entry(file.entry.blake3.clone())
                .or_insert_with(|| path.clone());
            let ChunkList::Listed(chunks) = &file.chunks else {
                continue;
            };
            let mut offset = 0u64;
            for c in chunks {
                if let Ok(id) = ChunkId::from_hex(&c.id) {
                    self.places
                        .entry(id)
                        .or_insert_with(|| (path.clone(), offset, c.len));
                }
                offset += u64::from(c.len);
            }
        }
    }

    /// An installed file that can stand for `entry` as it is: the same content (by the signed
    /// hash its version was verified against), size and installed mode.
    pub(crate) fn same_file(&self, entry: &fleetcast_events::manifest::FileEntry) -> Option<&Path> {
        let path = self.files.get(&entry.blake3)?;
        let meta = std::fs::symlink_metadata(path).ok()?;
        let mode = crate::isolation::installed_mode(entry.mode);
        (meta.is_file() && meta.len() == entry.size && meta.permissions().mode() & 0o7777 == mode)
            .then_some(path.as_path())
    }

    /// An installed file with this content (hex BLAKE3), by its verified hash.
    pub(crate) fn file(&self, blake3: &str) -> Option<&Path> {
        self.files.get(blake3).map(PathBuf::as_path)
    }

    /// Whether an installed version holds this chunk.
    pub(crate) fn has_chunk(&self, id: &ChunkId) -> bool {
        self.places.contains_key(id)
    }

    /// Reads a chunk from disk; `None` if it is not there (any more) or no longer matches.
    fn read(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let (path, offset, len) = self.places.get(id)?;
        read_verified(path, *offset, *len, id)
    }
}

fn read_verified(path: &Path, offset: u64, len: u32, id: &ChunkId) -> Option<Vec<u8>> {
    let file = File::open(path).ok()?;
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset).ok()?;
    (ChunkId::of(&buf) == *id).then_some(buf)
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AssembleReport {
    pub fetched_chunks: u64,
    /// Bytes transferred from the store (compressed as stored).
    pub fetched_bytes: u64,
    pub reused_chunks: u64,
    /// Chunks already in place from an interrupted attempt.
    pub resumed_chunks: u64,
    /// Unchanged files taken from an installed version by a hard link: nothing written.
    pub linked_files: u64,
    /// Files made by a binary patch from an installed file, the patches' bytes as
    /// transferred (also in `fetched_bytes`), and patches tried but refused (a piece not
    /// matching its name, a result not matching the signed hash): those files came from chunks.
    pub patched_files: u64,
    pub patch_bytes: u64,
    pub refused_patches: u64,
}

impl AssembleReport {
    /// One chunk placed, counted by where it came from.
    fn count(&mut self, source: Source) {
        match source {
            Source::Fetched(wire) => {
                self.fetched_chunks += 1;
                self.fetched_bytes += wire;
            }
            Source::Reused => self.reused_chunks += 1,
            Source::Resumed => self.resumed_chunks += 1,
        }
    }
}

struct Job {
    file: Arc<File>,
    /// Which of the files being hashed.
    index: usize,
    path: PathBuf,
    offset: u64,
    id: ChunkId,
    len: u32,
    /// Inside what an interrupted attempt wrote.
    resumable: bool,
}

#[derive(Clone, Copy)]
enum Source {
    /// Fetched from the store, with the bytes it cost.
    Fetched(u64),
    /// Copied from an installed version, or from another file of this version that holds
    /// the same chunk (fetched once).
    Reused,
    /// Already in place from an interrupted attempt.
    Resumed,
}

/// One chunk being read or fetched, shared by every job that needs it while it is under way.
type SharedChunk<'a> = futures::future::Shared<
    futures::future::BoxFuture<'a, Result<(Arc<Vec<u8>>, Source), Arc<AssembleError>>>,
>;

/// A chunk from an installed version, else from the store.
async fn get_chunk(
    local: &LocalChunks,
    remote: &impl ChunkSource,
    id: ChunkId,
    len: u32,
) -> Result<(Arc<Vec<u8>>, Source), Arc<AssembleError>> {
    if let Some(data) = local.read(&id) {
        return Ok((Arc::new(data), Source::Reused));
    }
    let fetched = remote.fetch(&id, len).await.map_err(Arc::new)?;
    let wire = fetched.wire_bytes;
    Ok((Arc::new(fetched.chunk.into_data()), Source::Fetched(wire)))
}

/// The error of a shared fetch, for one of the jobs that waited on it: the same kind, so a
/// refused chunk stays refused and a failed fetch stays worth retrying.
fn unshare(id: &ChunkId, e: Arc<AssembleError>) -> AssembleError {
    Arc::try_unwrap(e).unwrap_or_else(|e| match &*e {
        AssembleError::Chunk(c) => AssembleError::Chunk(c.clone()),
        AssembleError::Fetch { id, reason } => AssembleError::Fetch {
            id: id.clone(),
            reason: reason.clone(),
        },
        other => AssembleError::Fetch {
            id: id.to_hex(),
            reason: other.to_string(),
        },
    })
}

/// A regular file being assembled, hashed in order as its chunks arrive.
struct Hashing<'a> {
    entry: &'a fleetcast_events::manifest::FileEntry,
    path: PathBuf,
    file: Arc<File>,
    hasher: blake3::Hasher,
    chunks_left: usize,
}

impl Hashing<'_> {
    /// The whole file against the signed manifest, then its permissions. (Durability comes
    /// once for the whole version, before its rename: see [`make_durable`].) Consumed: the
    /// file is closed once complete.
    fn finish(self) -> Result<(), AssembleError> {
        if self.hasher.finalize().to_hex().as_str() != self.entry.blake3 {
            // Dropped so a retry fetches it afresh instead of resuming bad bytes.
            let _ = std::fs::remove_file(&self.path);
            return Err(AssembleError::FileMismatch(self.entry.path.clone()));
        }
        // Read-only for everyone, no setuid/setgid/sticky bit, whatever the package says.
        let mode =
            std::fs::Permissions::from_mode(crate::isolation::installed_mode(self.entry.mode));
        self.file.set_permissions(mode).map_err(io_err(&self.path))
    }
}

/// The chunks listed more than once (in several files or places of one).
fn repeated_chunks(listed: &[&[ChunkRef]]) -> std::collections::HashSet<ChunkId> {
    let mut seen = std::collections::HashSet::new();
    let mut repeated = std::collections::HashSet::new();
    for c in listed.iter().flat_map(|l| l.iter()) {
        if let Ok(id) = ChunkId::from_hex(&c.id)
            && !seen.insert(id)
        {
            repeated.insert(id);
        }
    }
    repeated
}

/// The files being hashed, by their place in the order of files: only those with chunks still
/// to come (a hasher is 2 KiB; a version of 200,000 files must not hold one per file).
struct Hashings<'a> {
    open: HashMap<usize, Hashing<'a>>,
    next: usize,
}

impl Hashings<'_> {
    /// The chunk `id` of file `index`, verified and written: hashed, and the file checked
    /// against the manifest once its last chunk is in.
    fn received(&mut self, index: usize, id: &ChunkId, data: &[u8]) -> Result<(), AssembleError> {
        let Some(file) = self.open.get_mut(&index) else {
            return Err(AssembleError::BadTree(format!(
                "chunk {id} of no open file"
            )));
        };
        file.hasher.update(data);
        file.chunks_left -= 1;
        if file.chunks_left == 0
            && let Some(done) = self.open.remove(&index)
        {
            done.finish()?;
        }
        Ok(())
    }
}

/// Opens the files to assemble one at a time, as their chunks are needed, and hands out their
/// chunks as jobs.
struct Planner<'a, I> {
    files: I,
    partial: &'a Path,
    local: &'a LocalChunks,
    /// Files made by a patch already.
    patched: &'a std::collections::HashSet<&'a str>,
    queue: VecDeque<Job>,
    /// The partial folder is an interrupted attempt's: a file may be there already.
    resumed: bool,
    /// The folder the last file went into, made already: files come in tree order, so most
    /// share their predecessor's (a version of thousands of unchanged files is mostly links,
    /// and each system call saved is a good part of one).
    made_dir: Option<PathBuf>,
}

impl<'a, I: Iterator<Item = (&'a TreeFile, &'a &'a [ChunkRef])>> Planner<'a, I> {
    /// The next chunk to place; `None` when every file has been planned. A file an installed
    /// version holds is linked here; an empty one is complete at once.
    fn next(
        &mut self,
        hashing: &mut Hashings<'a>,
        report: &mut AssembleReport,
    ) -> Result<Option<Job>, AssembleError> {
        loop {
            if let Some(job) = self.queue.pop_front() {
                return Ok(Some(job));
            }
            let Some((TreeFile { entry, .. }, chunks)) = self.files.next() else {
                return Ok(None);
            };
            if entry.link.is_some() || self.patched.contains(entry.path.as_str()) {
                continue;
            }
            let path = self.partial.join(&entry.path);
            if let Some(parent) = path.parent()
                && self.made_dir.as_deref() != Some(parent)
            {
                std::fs::create_dir_all(parent).map_err(io_err(parent))?;
                self.made_dir = Some(parent.to_path_buf());
            }
            if link_unchanged(self.local, entry, &path, self.resumed).map_err(io_err(&path))? {
                report.linked_files += 1;
                continue;
            }
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io_err(&path))?;
            // Only what an interrupted attempt wrote can be resumed: a new file has nothing to
            // read back.
            let written = file.metadata().map_err(io_err(&path))?.len();
            file.set_len(entry.size).map_err(io_err(&path))?;
            let file = Arc::new(file);
            let mut offset = 0u64;
            for c in chunks.iter() {
                let id = ChunkId::from_hex(&c.id)?;
                self.queue.push_back(Job {
                    file: file.clone(),
                    index: hashing.next,
                    path: path.clone(),
                    offset,
                    id,
                    len: c.len,
                    resumable: offset + u64::from(c.len) <= written,
                });
                offset += u64::from(c.len);
            }
            let this = Hashing {
                entry,
                path,
                file,
                hasher: blake3::Hasher::new(),
                chunks_left: chunks.len(),
            };
            // Files without chunks (empty) are complete already.
            if this.chunks_left == 0 {
                this.finish()?;
            } else {
                hashing.open.insert(hashing.next, this);
            }
            hashing.next += 1;
        }
    }
}

/// Assembles `version` from `files` (read from its signed tree) into its partial folder and
/// renames it into place. Returns at once if the version is already installed.
pub async fn assemble(
    root: &InstallRoot,
    version: &Version,
    files: &[TreeFile],
    local: &LocalChunks,
    patches: &PatchList,
    remote: &impl ChunkSource,
    concurrency: usize,
) -> Result<AssembleReport, AssembleError> {
    let final_dir = root.version_dir(version);
    if final_dir.is_dir() {
        return Ok(AssembleReport::default());
    }
    let listed = check_files(files)?;
    let partial = root.partial_dir(version);
    let resumed = open_partial(&partial)?;
    let mut report = AssembleReport::default();
    // Rebuilt files a patch makes from an installed file for less than their chunks.
    let patched = crate::patching::apply_patches(
        &partial,
        files,
        &listed,
        local,
        patches,
        remote,
        concurrency,
        &mut report,
    )
    .await?;
    // Regular files first, so no write can pass through a link the manifest creates.
    let planner = Planner {
        files: files.iter().zip(listed.iter()),
        partial: &partial,
        local,
        patched: &patched,
        queue: VecDeque::new(),
        resumed,
        made_dir: None,
    };
    let repeated = repeated_chunks(&listed);
    place_chunks(planner, &repeated, local, remote, concurrency, &mut report).await?;
    make_links(files, &partial)?;
    install(root, &partial, &final_dir)?;
    Ok(report)
}

/// Makes the partial folder; whether it is an interrupted attempt's (then resumed).
fn open_partial(partial: &Path) -> Result<bool, AssembleError> {
    let resumed = partial.is_dir();
    if resumed {
        // An interrupted attempt may have sealed files (or, just before its rename, the whole
        // folder): writable for the agent again, so it can be resumed without root.
        crate::isolation::unseal_tree(partial).map_err(io_err(partial))?;
    }
    std::fs::create_dir_all(partial).map_err(io_err(partial))?;
    Ok(resumed)
}

/// Where a chunk was written: the file, the offset and the length.
type Place = (PathBuf, u64, u32);

/// Every chunk of every regular file the planner hands out, `concurrency` at a time. Every
/// chunk is a job, in file order: the results come back in that order, so each file's hash is
/// computed from the verified chunks as they arrive instead of reading the file back. Files
/// are opened as their jobs come up, so only a few are open at a time however many the
/// version holds. `repeated`: the chunks the version holds more than once.
async fn place_chunks<'a, I: Iterator<Item = (&'a TreeFile, &'a &'a [ChunkRef])>>(
    mut planner: Planner<'a, I>,
    repeated: &std::collections::HashSet<ChunkId>,
    local: &LocalChunks,
    remote: &impl ChunkSource,
    concurrency: usize,
    report: &mut AssembleReport,
) -> Result<(), AssembleError> {
    let mut hashing = Hashings {
        open: HashMap::new(),
        next: 0,
    };
    // A chunk that several files (or places in one) hold is fetched once: jobs in flight
    // together share one fetch; a later job copies it from where this attempt wrote it.
    let mut sharing: HashMap<ChunkId, SharedChunk<'_>> = HashMap::new();
    // Kept only for the repeated chunks.
    let mut written: HashMap<ChunkId, Place> = HashMap::new();
    let mut inflight = FuturesOrdered::new();
    loop {
        while inflight.len() < concurrency.max(1) {
            let Some(job) = planner.next(&mut hashing, report)? else {
                break;
            };
            let copy_from = written.get(&job.id).cloned();
            let (shared, first) = match sharing.get(&job.id) {
                Some(shared) => (shared.clone(), false),
                None => {
                    use futures::FutureExt;
                    let shared = get_chunk(local, remote, job.id, job.len).boxed().shared();
                    if copy_from.is_none() {
                        sharing.insert(job.id, shared.clone());
                    }
                    (shared, true)
                }
            };
            inflight.push_back(place_chunk(job, copy_from, shared, first));
        }
        let Some(result) = inflight.next().await else {
            return Ok(());
        };
        let (index, id, place, data, source) = result?;
        // From now on a later job copies it from here instead of fetching it again.
        sharing.remove(&id);
        if repeated.contains(&id) {
            written.entry(id).or_insert(place);
        }
        report.count(source);
        hashing.received(index, &id, &data)?;
    }
}

/// Places one chunk: what an interrupted attempt left there if it is whole, else a copy from
/// where this attempt wrote it already, else the (shared) read or fetch; `first`: this job
/// started that fetch (the others count it as reused).
async fn place_chunk(
    job: Job,
    copy_from: Option<Place>,
    shared: SharedChunk<'_>,
    first: bool,
) -> Result<(usize, ChunkId, Place, Arc<Vec<u8>>, Source), AssembleError> {
    if job.resumable
        && let Some(data) = read_verified(&job.path, job.offset, job.len, &job.id)
    {
        let place = (job.path, job.offset, job.len);
        return Ok((job.index, job.id, place, Arc::new(data), Source::Resumed));
    }
    let copied =
        copy_from.and_then(|(path, offset, len)| read_verified(&path, offset, len, &job.id));
    let (data, source) = match copied {
        Some(data) => (Arc::new(data), Source::Reused),
        None => {
            let (data, source) = shared.await.map_err(|e| unshare(&job.id, e))?;
            (data, if first { source } else { Source::Reused })
        }
    };
    job.file
        .write_all_at(&data, job.offset)
        .map_err(io_err(&job.path))?;
    let place = (job.path, job.offset, job.len);
    Ok((job.index, job.id, place, data, source))
}

/// The links the manifest creates, once every regular file is written.
fn make_links(files: &[TreeFile], partial: &Path) -> Result<(), AssembleError> {
    for TreeFile { entry, .. } in files {
        if let Some(target) = &entry.link {
            let path = partial.join(&entry.path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            let _ = std::fs::remove_file(&path);
            std::os::unix::fs::symlink(target, &path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// Seals the complete version, makes it durable and renames it into place.
fn install(root: &InstallRoot, partial: &Path, final_dir: &Path) -> Result<(), AssembleError> {
    // No write bit anywhere in an installed version: the app cannot change its own code.
    crate::isolation::seal_tree(partial).map_err(io_err(partial))?;
    let syncing = std::time::Instant::now();
    make_durable(partial).map_err(io_err(partial))?;
    tracing::debug!(ms = syncing.elapsed().as_millis(), "version made durable");
    std::fs::rename(partial, final_dir).map_err(io_err(final_dir))?;
    sync_dir(final_dir.parent().unwrap_or(root.root())).map_err(io_err(final_dir))?;
    Ok(())
}

/// Takes an unchanged file from an installed version by a hard link: the same inode, verified
/// when its version was installed, sealed read-only and already durable, so nothing is written
/// or synced for it. Whether it did; where the filesystem will not link (another device, too
/// many links) the file is assembled as any other. `resumed`: `path` may be there already,
/// from an interrupted attempt.
fn link_unchanged(
    local: &LocalChunks,
    entry: &fleetcast_events::manifest::FileEntry,
    path: &Path,
    resumed: bool,
) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let source = local.same_file(entry);
    // A fresh attempt has nothing there (patched files never come here): no need to look.
    let existing = resumed
        .then(|| std::fs::symlink_metadata(path).ok())
        .flatten();
    if let Some(existing) = existing {
        let same_inode = source
            .and_then(|s| std::fs::metadata(s).ok())
            .is_some_and(|s| s.ino() == existing.ino() && s.dev() == existing.dev());
        if same_inode {
            // Linked by an interrupted attempt.
            return Ok(true);
        }
        // A partly written copy (replaced by the link), or an inode an interrupted attempt
        // linked, which must never be written through: it is an installed version's file.
        if source.is_some() || existing.nlink() > 1 {
            std::fs::remove_file(path)?;
        }
    }
    let Some(source) = source else {
        return Ok(false);
    };
    match std::fs::hard_link(source, path) {
        Ok(()) => Ok(true),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::CrossesDevices
                    | io::ErrorKind::PermissionDenied
                    | io::ErrorKind::TooManyLinks
                    | io::ErrorKind::Unsupported
            ) =>
        {
            tracing::debug!(path = %path.display(), error = %e, "not linked; written instead");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Every file's chunk list must be resolved, with chunk lengths that add up to its size; links
/// must stay inside the version and no path may pass through one. The chunk lists, in order.
fn check_files(files: &[TreeFile]) -> Result<Vec<&[ChunkRef]>, AssembleError> {
    let bad = |m: String| Err(AssembleError::BadTree(m));
    // Every link resolved one component at a time through the version's own links, before
    // anything is written (see `fleetcast_package::links`).
    fleetcast_package::links::check(
        files
            .iter()
            .map(|f| (f.entry.path.as_str(), f.entry.link.as_deref())),
    )
    .map_err(|e| AssembleError::BadTree(e.to_string()))?;
    let mut listed = Vec::with_capacity(files.len());
    for TreeFile { entry, chunks } in files {
        let ChunkList::Listed(chunks) = chunks else {
            return bad(format!("the chunks of {} were not read", entry.path));
        };
        listed.push(chunks.as_slice());
        if entry.link.is_some() {
            continue;
        }
        let total: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
        if total != entry.size
            || chunks
                .iter()
                .any(|c| c.len == 0 || c.len as usize > MAX_CHUNK)
        {
            return bad(format!(
                "chunks of {} add up to {total} bytes, the manifest says {}",
                entry.path, entry.size
            ));
        }
    }
    Ok(listed)
}

/// Everything written into `partial` on disk before it is renamed into place: one `syncfs` of
/// its filesystem rather than an fsync per file (a version of thousands of files spent most of
/// its install in them). Where `syncfs` is refused, every file and folder is synced one by one.
fn make_durable(partial: &Path) -> io::Result<()> {
    let dir = File::open(partial)?;
    match nix::unistd::syncfs(&dir) {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::debug!(error = %e, "syncfs refused; syncing file by file");
            sync_tree(partial)
        }
    }
}

/// fsync every file and folder below `dir`.
fn sync_tree(dir: &Path) -> io::Result<()> {
    use crate::isolation::{Visit, walk_tree};
    walk_tree(dir, &mut |visit| match visit {
        Visit::File(entry) => File::open(entry.path())?.sync_all(),
        // After what it holds, so the folder's own entries are final.
        Visit::Leave(folder) => sync_dir(folder),
        Visit::Enter(_) => Ok(()),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_the_filesystem_refuses_are_permanent_other_disk_errors_are_not() {
        let io = |e: std::io::Error| super::AssembleError::Io {
            path: "x".into(),
            source: e,
        };
        for errno in [
            libc::ENAMETOOLONG,
            libc::ENOTDIR,
            libc::EISDIR,
            libc::EILSEQ,
        ] {
            let e = io(std::io::Error::from_raw_os_error(errno));
            assert!(!e.is_transient(), "errno {errno}: {e}");
        }
        for errno in [libc::ENOSPC, libc::EIO, libc::EEXIST, libc::EACCES] {
            let e = io(std::io::Error::from_raw_os_error(errno));
            assert!(e.is_transient(), "errno {errno}: {e}");
        }
        // A real one: a name over 255 bytes.
        let dir = tempfile::tempdir().expect("tmp");
        let long = dir.path().join("n".repeat(256));
        let e = io(std::fs::write(&long, b"x").expect_err("too long"));
        assert!(!e.is_transient(), "{e}");
    }

    use fleetcast_events::FileEntry;

    use super::*;

    /// No chunk is needed: the files here are empty.
    struct NoStore;

    impl ChunkSource for NoStore {
        async fn fetch(&self, id: &ChunkId, _len: u32) -> Result<Fetched, AssembleError> {
            Err(AssembleError::Fetch {
                id: id.to_hex(),
                reason: "no store in this test".into(),
            })
        }
    }

    fn entry(path: &str, link: Option<String>) -> FileEntry {
        FileEntry {
            path: path.into(),
            mode: 0o644,
            size: 0,
            blake3: blake3::hash(b"").to_hex().to_string(),
            link,
        }
    }

    /// `files` as a signed tree would list them (were its signer fooled), without chunks.
    fn signed(files: Vec<FileEntry>) -> (Version, Vec<TreeFile>) {
        signed_as(Version::new(1, 0, 0), files)
    }

    fn signed_as(version: Version, files: Vec<FileEntry>) -> (Version, Vec<TreeFile>) {
        let files = files
            .into_iter()
            .map(|entry| TreeFile {
                entry,
                chunks: ChunkList::Listed(Vec::new()),
            })
            .collect();
        (version, files)
    }

    /// `assemble` with nothing installed before (no local chunks, no patches): every chunk
    /// comes from `store`.
    async fn assemble_from(
        store: &impl ChunkSource,
        root: &InstallRoot,
        version: &Version,
        files: &[TreeFile],
        concurrency: usize,
    ) -> Result<AssembleReport, AssembleError> {
        assemble(
            root,
            version,
            files,
            &LocalChunks::default(),
            &PatchList::default(),
            store,
            concurrency,
        )
        .await
    }

    /// Serves chunks from memory and counts each fetch.
    struct Counting {
        stored: HashMap<ChunkId, Vec<u8>>,
        fetches: std::sync::Mutex<Vec<ChunkId>>,
    }

    impl ChunkSource for Counting {
        async fn fetch(&self, id: &ChunkId, len: u32) -> Result<Fetched, AssembleError> {
            self.fetches.lock().expect("lock").push(*id);
            // Let other jobs start meanwhile, as a network fetch does.
            tokio::task::yield_now().await;
            let stored = self.stored.get(id).ok_or_else(|| AssembleError::Fetch {
                id: id.to_hex(),
                reason: "not stored".into(),
            })?;
            Ok(Fetched {
                chunk: chunking::verify(id, len, stored)?,
                wire_bytes: stored.len() as u64,
            })
        }
    }

    /// Three copies of one file and a file that repeats one chunk: every distinct chunk is
    /// fetched once, whether its other uses are in flight at the same time (shared) or come
    /// later (copied from where it was written), and every file is whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_distinct_chunk_is_fetched_once_however_many_files_hold_it() {
        // Incompressible, never repeating: distinct chunks.
        let data = noise(2_400_000, 0x9E37_79B9_7F4A_7C15);
        let body = fleetcast_package::chunking::chunks(std::io::Cursor::new(data))
            .map(|c| c.expect("chunk"))
            .collect::<Vec<_>>();
        assert!(body.len() > 3, "several chunks");
        let mut stored = HashMap::new();
        for (id, data) in &body {
            stored.insert(*id, chunking::encode_stored(data).expect("encode"));
        }
        let whole: Vec<u8> = body.iter().flat_map(|(_, d)| d.clone()).collect();
        // A file made of the first chunk three times.
        let first = &body[0].1;
        let repeated: Vec<u8> = [first.as_slice(); 3].concat();
        let file = |path: &str, data: &[u8]| FileEntry {
            path: path.into(),
            mode: 0o644,
            size: data.len() as u64,
            blake3: blake3::hash(data).to_hex().to_string(),
            link: None,
        };
        let files = vec![
            file("a/one", &whole),
            file("a/two", &whole),
            file("b/three", &repeated),
            file("c/four", &whole),
        ];
        let (version, mut tree) = signed(files);
        let refs = |ids: &[&(ChunkId, Vec<u8>)]| {
            ids.iter()
                .map(|(id, d)| chunking::chunk_ref(id, d.len()))
                .collect::<Vec<_>>()
        };
        let all: Vec<&(ChunkId, Vec<u8>)> = body.iter().collect();
        tree[0].chunks = ChunkList::Listed(refs(&all));
        tree[1].chunks = ChunkList::Listed(refs(&all));
        tree[2].chunks = ChunkList::Listed(refs(&[&body[0], &body[0], &body[0]]));
        tree[3].chunks = ChunkList::Listed(refs(&all));
        let store = Counting {
            stored,
            fetches: Default::default(),
        };
        let tmp = tempfile::tempdir().expect("tmp");
        let root = InstallRoot::new(tmp.path()).expect("root");
        let report = assemble_from(&store, &root, &version, &tree, 8)
            .await
            .expect("assembled");
        let fetches = store.fetches.lock().expect("lock").clone();
        let distinct: std::collections::HashSet<_> = fetches.iter().collect();
        assert_eq!(fetches.len(), distinct.len(), "a chunk fetched twice");
        assert_eq!(fetches.len(), body.len());
        assert_eq!(report.fetched_chunks, body.len() as u64);
        let dir = root.version_dir(&version);
        for path in ["a/one", "a/two", "c/four"] {
            assert!(
                std::fs::read(dir.join(path)).expect("read") == whole,
                "{path}"
            );
        }
        assert_eq!(std::fs::read(dir.join("b/three")).expect("read"), repeated);
    }

    /// Incompressible bytes that never repeat (xorshift from `seed`).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out: Vec<u8> = std::iter::repeat_with(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .take(len.div_ceil(8))
        .flatten()
        .collect();
        out.truncate(len);
        out
    }

    /// `files` (path, content, mode) signed as `version`, their chunks put in `stored`.
    fn release(
        version: Version,
        files: &[(&str, &[u8], u32)],
        stored: &mut HashMap<ChunkId, Vec<u8>>,
    ) -> (Version, Vec<TreeFile>) {
        let entries = files
            .iter()
            .map(|(path, data, mode)| FileEntry {
                path: path.to_string(),
                mode: *mode,
                size: data.len() as u64,
                blake3: blake3::hash(data).to_hex().to_string(),
                link: None,
            })
            .collect();
        let (version, mut tree) = signed_as(version, entries);
        for (file, (_, data, _)) in tree.iter_mut().zip(files) {
            let mut list = Vec::new();
            for c in fleetcast_package::chunking::chunks(std::io::Cursor::new(data.to_vec())) {
                let (id, chunk) = c.expect("chunk");
                stored.insert(id, chunking::encode_stored(&chunk).expect("encode"));
                list.push(chunking::chunk_ref(&id, chunk.len()));
            }
            file.chunks = ChunkList::Listed(list);
        }
        (version, tree)
    }

    /// v2 changes one file of three: the two others are hard links to v1's (the same inodes,
    /// nothing fetched or written for them), the changed one is new; v2 is byte-identical to
    /// its package and read-only; removing v1 leaves v2's shared files read-only and whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unchanged_files_are_hard_links_to_the_installed_version() {
        use std::os::unix::fs::MetadataExt;
        let (a, b, c1, c2) = (
            noise(300_000, 1),
            noise(1000, 2),
            noise(200_000, 3),
            noise(200_000, 4),
        );
        let mut stored = HashMap::new();
        // v1 and v2: the same files but for `lib/x`.
        let mut release_with_lib = |version: Version, lib: &Vec<u8>| {
            release(
                version,
                &[
                    ("bin/app", &a, 0o755),
                    ("etc/conf", &b, 0o644),
                    ("lib/x", lib, 0o644),
                ],
                &mut stored,
            )
        };
        let (m1, i1) = release_with_lib(Version::new(1, 0, 0), &c1);
        let (m2, i2) = release_with_lib(Version::new(2, 0, 0), &c2);
        let store = Counting {
            stored,
            fetches: Default::default(),
        };
        let tmp = tempfile::tempdir().expect("tmp");
        let root = InstallRoot::new(tmp.path()).expect("root");
        assemble_from(&store, &root, &m1, &i1, 4).await.expect("v1");
        let before = store.fetches.lock().expect("lock").len();
        let (d1, d2) = (root.version_dir(&m1), root.version_dir(&m2));
        let mut local = LocalChunks::default();
        local.add_version(&d1, &i1);
        let report = assemble(&root, &m2, &i2, &local, &PatchList::default(), &store, 4)
            .await
            .expect("v2");
        assert_eq!(report.linked_files, 2, "{report:?}");
        let fetched_for_v2 = store.fetches.lock().expect("lock").len() - before;
        let ChunkList::Listed(changed) = &i2[2].chunks else {
            panic!("listed")
        };
        assert_eq!(fetched_for_v2, changed.len(), "only lib/x's chunks");
        let ino = |p: &Path| std::fs::metadata(p).expect("meta").ino();
        for path in ["bin/app", "etc/conf"] {
            assert_eq!(ino(&d1.join(path)), ino(&d2.join(path)), "{path} linked");
        }
        assert_ne!(ino(&d1.join("lib/x")), ino(&d2.join("lib/x")));
        crate::isolation::remove_installed(&d1).expect("v1 removed");
        for (path, data, mode) in [
            ("bin/app", &a, 0o555),
            ("etc/conf", &b, 0o444),
            ("lib/x", &c2, 0o444),
        ] {
            let p = d2.join(path);
            assert_eq!(&std::fs::read(&p).expect("read"), data, "{path}");
            let meta = std::fs::metadata(&p).expect("meta");
            assert_eq!(
                meta.permissions().mode() & 0o7777,
                mode,
                "{path} stays read-only"
            );
        }
    }

    /// The chain of issue 16 in a signed manifest: `y` stays inside, `z`'s text does too, but
    /// the file system follows `y` first and `z` then climbs out to `/etc/passwd`. Refused
    /// before anything is written; the same version without `z` installs.
    #[tokio::test]
    async fn a_chain_of_links_that_climbs_out_is_refused_before_anything_is_written() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = InstallRoot::new(tmp.path()).expect("root");
        let deep = "a1/a2/a3/a4/a5/a6/a7/a8";
        let inside = vec![
            entry(&format!("{deep}/keep"), None),
            entry(
                &format!("{deep}/y"),
                Some("../../../../../../../../c".into()),
            ),
        ];
        let mut hostile = inside.clone();
        hostile.push(entry(
            "z",
            Some(format!("{deep}/y/{}etc/passwd", "../".repeat(9))),
        ));
        let (manifest, index) = signed(hostile);
        let err = assemble_from(&NoStore, &root, &manifest, &index, 2)
            .await
            .expect_err("refused");
        assert!(
            matches!(&err, AssembleError::BadTree(m) if m.contains("leaves the package")),
            "{err}"
        );
        assert!(!err.is_transient());
        assert!(!root.partial_dir(&manifest).exists());
        assert!(!root.version_dir(&manifest).exists());

        let (manifest, index) = signed(inside);
        assemble_from(&NoStore, &root, &manifest, &index, 2)
            .await
            .expect("links that stay inside install");
        let y = root.version_dir(&manifest).join(deep).join("y");
        assert_eq!(
            std::fs::read_link(y).expect("link"),
            PathBuf::from("../../../../../../../../c")
        );
    }
}
