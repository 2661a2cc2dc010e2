//! Binary patches for rebuilt files (`fleetcast_events::patches`), made once a release is stored
//! and the tracker asked for them (`patches_wanted`, naming the versions agents run). For each
//! file of the release whose chunks are mostly new against the same path in a base version, a
//! zstd patch from the base file is made; it is kept if it costs less than the chunks a host
//! holding the base would fetch. Everything is read from the store (not the archive, gone by
//! then), so any distributor can do it at any time, and doing it again changes nothing.

use std::collections::{HashMap, HashSet};

use fleetcast_events::VerifiedManifest;
use fleetcast_events::patches::{MAX_LIST_BYTES, MAX_PIECE, Patch, PatchList, Piece};
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
    Task(#[from] tokio::task::JoinError),
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
    let mut files = store.tree_files(app, &release.tree).await?;
    files.retain(|f| {
        f.entry.link.is_none()
            && (settings.min_file_bytes..=settings.max_file_bytes).contains(&f.entry.size)
    });
    files.shrink_to_fit();
    let paths: HashSet<&str> = files.iter().map(|f| f.entry.path.as_str()).collect();
    for base in bases {
        if files.is_empty() {
            break;
        }
        let base_files = base_files(store, app, base, &paths, settings).await?;
        let by_path: HashMap<&str, &TreeFile> = base_files
            .iter()
            .map(|f| (f.entry.path.as_str(), f))
            .collect();
        for file in &files {
            let Some(old) = by_path.get(file.entry.path.as_str()) else {
                continue;
            };
            let Some(candidate) = Candidate::of(file, old, &list) else {
                continue;
            };
            report.candidates += 1;
            let Some((bytes, delta)) = make_patch(store, app, &candidate, settings.level).await?
            else {
                continue;
            };
            if bytes.len() as u64 >= delta {
                report.not_smaller += 1;
                continue;
            }
            let entry = Patch {
                file: candidate.file_hash,
                base: candidate.base_hash,
                len: bytes.len() as u64,
                delta,
                pieces: store_pieces(store, app, &bytes).await?,
            };
            let mut grown = list.clone();
            grown.insert(entry);
            if grown.encode().is_err() {
                tracing::warn!(
                    max = MAX_LIST_BYTES,
                    "patch list full: no more patches for this release"
                );
                break;
            }
            list = grown;
            report.made += 1;
            report.patch_bytes += bytes.len() as u64;
            report.delta_bytes += delta;
            tracing::info!(base = %base.version, path = %file.entry.path, patch_bytes = bytes.len(),
                chunk_bytes = delta, "patch made");
        }
    }
    if list != before {
        store.put_patch_list(app, root, &list).await?;
    }
    Ok(report)
}

/// The files of `base` a patch may start from: those of `paths` (the release's candidates),
/// not links, and not over the size limit.
async fn base_files(
    store: &ChunkStore,
    app: &str,
    base: &VerifiedManifest,
    paths: &HashSet<&str>,
    settings: &PatchSettings,
) -> Result<Vec<TreeFile>, StoreError> {
    let mut files = store.tree_files(app, &base.tree).await?;
    files.retain(|f| {
        f.entry.link.is_none()
            && f.entry.size <= settings.max_file_bytes
            && paths.contains(f.entry.path.as_str())
    });
    Ok(files)
}

/// A file worth a patch from the same path in a base version.
struct Candidate<'a> {
    file: &'a TreeFile,
    old: &'a TreeFile,
    file_hash: Hash32,
    base_hash: Hash32,
    /// The new file's chunks, in order.
    chunks: Vec<(ChunkId, u32)>,
    /// The chunks of the base file, which a host holding the base has.
    held: HashSet<ChunkId>,
}

impl<'a> Candidate<'a> {
    /// `file` as a candidate for a patch from `old`: changed, not listed in `list` yet, and
    /// mostly new chunk by chunk (a file mostly shared with the base fetches little as
    /// chunks already).
    fn of(file: &'a TreeFile, old: &'a TreeFile, list: &PatchList) -> Option<Candidate<'a>> {
        if old.entry.blake3 == file.entry.blake3 {
            return None;
        }
        let file_hash = Hash32::from_hex(&file.entry.blake3).ok()?;
        let base_hash = Hash32::from_hex(&old.entry.blake3).ok()?;
        if list.find(&file_hash, &base_hash).is_some() {
            return None;
        }
        let held: HashSet<ChunkId> = chunks_of(old).into_iter().map(|(id, _)| id).collect();
        let chunks = chunks_of(file);
        let missing: u64 = chunks
            .iter()
            .filter(|(id, _)| !held.contains(id))
            .map(|(_, len)| u64::from(*len))
            .sum();
        (missing * 2 >= file.entry.size).then_some(Candidate {
            file,
            old,
            file_hash,
            base_hash,
            chunks,
            held,
        })
    }
}

/// The patch from the base file to the new one, and what the new file's chunks a host holding
/// the base lacks cost as stored; `None` if no patch could be made of them.
async fn make_patch(
    store: &ChunkStore,
    app: &str,
    candidate: &Candidate<'_>,
    level: i32,
) -> Result<Option<(Vec<u8>, u64)>, PatchError> {
    let (new, delta) = read_file(store, app, &candidate.chunks, &candidate.held).await?;
    let (old, _) = read_file(store, app, &chunks_of(candidate.old), &HashSet::new()).await?;
    let made = tokio::task::spawn_blocking(move || patch::make(&old, &new, level)).await?;
    match made {
        Ok(bytes) => Ok(Some((bytes, delta))),
        Err(e) => {
            tracing::warn!(path = %candidate.file.entry.path, error = %e, "no patch made");
            Ok(None)
        }
    }
}

/// Stores a patch's bytes as pieces of at most [`MAX_PIECE`] bytes: its pieces, in order.
async fn store_pieces(
    store: &ChunkStore,
    app: &str,
    bytes: &[u8],
) -> Result<Vec<Piece>, StoreError> {
    let mut pieces = Vec::new();
    for piece in bytes.chunks(MAX_PIECE) {
        let id = ChunkId::of(piece);
        store.store(app, id, piece.to_vec()).await?;
        pieces.push(Piece {
            id: Hash32(id.0),
            len: piece.len() as u32,
        });
    }
    Ok(pieces)
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

#[cfg(test)]
mod tests {
    use fleetcast_events::manifest::FileEntry;
    use fleetcast_package::chunking;

    use super::*;

    /// A file of `path` whose chunks hold `parts`, one chunk each.
    fn file(path: &str, parts: &[&[u8]]) -> TreeFile {
        let content = parts.concat();
        TreeFile {
            entry: FileEntry {
                path: path.into(),
                mode: 0o644,
                size: content.len() as u64,
                blake3: blake3::hash(&content).to_hex().to_string(),
                link: None,
            },
            chunks: ChunkList::Listed(
                parts
                    .iter()
                    .map(|p| chunking::chunk_ref(&ChunkId::of(p), p.len()))
                    .collect(),
            ),
        }
    }

    #[test]
    fn a_file_mostly_new_chunk_by_chunk_is_a_candidate_once() {
        let (a, b, c, d) = (
            &[1u8; 100][..],
            &[2u8; 100][..],
            &[3u8; 100][..],
            &[4u8; 100][..],
        );
        let old = file("bin/app", &[a, b, c, d]);
        let empty = PatchList::default();
        // Half of it new: worth a patch.
        let rebuilt = file("bin/app", &[a, b, &[5; 100], &[6; 100]]);
        let candidate = Candidate::of(&rebuilt, &old, &empty).expect("half new");
        assert_eq!(candidate.chunks.len(), 4);
        assert_eq!(candidate.held.len(), 4);
        // Mostly shared: its few new chunks fetch little already.
        let touched = file("bin/app", &[a, b, c, &[5; 100]]);
        assert!(Candidate::of(&touched, &old, &empty).is_none());
        // Unchanged: nothing to patch.
        assert!(Candidate::of(&old, &old, &empty).is_none());
        // Listed already: made before.
        let mut listed = PatchList::default();
        listed.insert(Patch {
            file: candidate.file_hash,
            base: candidate.base_hash,
            len: 1,
            delta: 200,
            pieces: Vec::new(),
        });
        assert!(Candidate::of(&rebuilt, &old, &listed).is_none());
    }
}
