//! Binary patches for rebuilt files (`fleetcast_events::patches`), made once a release is stored
//! and the tracker asked for them (`patches_wanted`, naming the versions agents run). For each
//! file of the release whose chunks are mostly new against the same path in a base version, a
//! zstd patch from the base file is made; it is kept if it costs less than the chunks a host
//! holding the base would fetch. Everything is read from the store (not the archive, gone by
//! then), so any distributor can do it at any time, and doing it again changes nothing.

use std::collections::{HashMap, HashSet};

use fleetcast_events::VerifiedManifest;
use fleetcast_events::patches::{MAX_LIST_BYTES, MAX_PIECE, Patch, Piece};
use fleetcast_events::tree::{ChunkList, Hash32, TreeFile};
use fleetcast_package::chunking::ChunkId;
use fleetcast_package::patch;

use crate::ingest::{ChunkStore, StoreError};
use crate::settings::PatchSettings;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PatchReport {
    /// Files looked at: changed against a base and mostly new chunk by chunk.
    pub candidates: u64,
    /// Patches made and listed (smaller than the chunks they stand for).
    pub made: u64,
    /// Their bytes, and what the chunks they stand for cost.
    pub patch_bytes: u64,
    pub delta_bytes: u64,
    /// Patches made but not kept: no smaller than the chunks.
    pub not_smaller: u64,
}

/// A file's chunks, in order, as `ChunkStore::tree_files` resolved them (a one-chunk file's
/// single chunk included).
fn chunks_of(file: &TreeFile) -> Vec<(ChunkId, u32)> {
    match &file.chunks {
        ChunkList::Listed(list) => list
            .iter()
            .filter_map(|c| ChunkId::from_hex(&c.id).ok().map(|id| (id, c.len)))
            .collect(),
        ChunkList::Tree { .. } => Vec::new(),
    }
}

/// Why a patch job did not finish.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The task making a patch ended without an answer.
    #[error("patch task failed: {0}")]
    Task(String),
}

impl PatchError {
    /// Whether the job is worth trying again: not when the store holds a base's objects no
    /// more, or holds them corrupt (the hosts fetch chunks instead).
    pub fn is_transient(&self) -> bool {
        match self {
            PatchError::Store(e) => e.is_transient(),
            PatchError::Task(_) => true,
        }
    }
}

/// Makes the patches of `release` from each of `bases` that the store does not list yet, and
/// stores them and the release's patch list.
pub async fn make_patches(
    store: &ChunkStore,
    release: &VerifiedManifest,
    bases: &[VerifiedManifest],
    settings: &PatchSettings,
) -> Result<PatchReport, PatchError> {
    let app = release.app.as_str();
    let root = release.tree.root.as_str();
    let mut report = PatchReport::default();
    let mut list = store.patch_list(app, root).await?;
    let before = list.clone();
    // Only files in the size range may get a patch: of a tree of many small files, next to
    // nothing is kept (one tree in memory at a time, not the release's and each base's whole).
    let sized = |f: &TreeFile| {
        f.entry.link.is_none()
            && (settings.min_file_bytes..=settings.max_file_bytes).contains(&f.entry.size)
    };
    let mut files = store.tree_files(app, &release.tree).await?;
    files.retain(sized);
    files.shrink_to_fit();
    let paths: HashSet<&str> = files.iter().map(|f| f.entry.path.as_str()).collect();
    for base in bases {
        if files.is_empty() {
            break;
        }
        let mut base_files = store.tree_files(app, &base.tree).await?;
        base_files.retain(|f| {
            f.entry.link.is_none()
                && f.entry.size <= settings.max_file_bytes
                && paths.contains(f.entry.path.as_str())
        });
        let by_path: HashMap<&str, &TreeFile> = base_files
            .iter()
            .map(|f| (f.entry.path.as_str(), f))
            .collect();
        for file in &files {
            let Some(old) = by_path.get(file.entry.path.as_str()) else {
                continue;
            };
            if old.entry.blake3 == file.entry.blake3 {
                continue;
            }
            let (Ok(file_hash), Ok(base_hash)) = (
                Hash32::from_hex(&file.entry.blake3),
                Hash32::from_hex(&old.entry.blake3),
            ) else {
                continue;
            };
            if list.find(&file_hash, &base_hash).is_some() {
                continue;
            }
            let new_chunks = chunks_of(file);
            let held: HashSet<ChunkId> = chunks_of(old).into_iter().map(|(id, _)| id).collect();
            let missing: u64 = new_chunks
                .iter()
                .filter(|(id, _)| !held.contains(id))
                .map(|(_, len)| u64::from(*len))
                .sum();
            // Mostly shared with the base: chunks already fetch little.
            if missing * 2 < file.entry.size {
                continue;
            }
            report.candidates += 1;
            let (new, delta) = read_file(store, app, &new_chunks, &held).await?;
            let (old_bytes, _) = read_file(store, app, &chunks_of(old), &HashSet::new()).await?;
            let level = settings.level;
            let made = tokio::task::spawn_blocking(move || patch::make(&old_bytes, &new, level))
                .await
                .map_err(|e| PatchError::Task(e.to_string()))?;
            let bytes = match made {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::warn!(app, path = %file.entry.path, error = %e, "no patch made");
                    continue;
                }
            };
            if bytes.len() as u64 >= delta {
                report.not_smaller += 1;
                continue;
            }
            let mut pieces = Vec::new();
            for piece in bytes.chunks(MAX_PIECE) {
                let id = ChunkId::of(piece);
                store.store(app, id, piece.to_vec()).await?;
                pieces.push(Piece {
                    id: Hash32(id.0),
                    len: piece.len() as u32,
                });
            }
            let entry = Patch {
                file: file_hash,
                base: base_hash,
                len: bytes.len() as u64,
                delta,
                pieces,
            };
            let mut grown = list.clone();
            grown.insert(entry);
            if grown.encode().is_err() {
                tracing::warn!(app, version = %release.version, max = MAX_LIST_BYTES, "patch list full: no more patches for this release");
                break;
            }
            list = grown;
            report.made += 1;
            report.patch_bytes += bytes.len() as u64;
            report.delta_bytes += delta;
            tracing::info!(app, version = %release.version, base = %base.version, path = %file.entry.path,
                patch_bytes = bytes.len(), chunk_bytes = delta, "patch made");
        }
    }
    if list != before {
        store.put_patch_list(app, root, &list).await?;
    }
    Ok(report)
}

/// A stored file's bytes, from its chunks; and what the chunks not in `held` cost as stored.
async fn read_file(
    store: &ChunkStore,
    app: &str,
    chunks: &[(ChunkId, u32)],
    held: &HashSet<ChunkId>,
) -> Result<(Vec<u8>, u64), StoreError> {
    let mut out = Vec::with_capacity(chunks.iter().map(|(_, l)| *l as usize).sum());
    let mut cost = 0;
    let mut counted = HashSet::new();
    for (id, len) in chunks {
        let (data, stored) = store.get(app, *id, *len).await?;
        // A chunk the file holds twice is fetched once.
        if !held.contains(id) && counted.insert(*id) {
            cost += stored;
        }
        out.extend_from_slice(&data);
    }
    Ok((out, cost))
}
