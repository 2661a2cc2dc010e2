//! Files made by a binary patch (`fleetcast_events::patches`) from a file an installed version
//! holds, when the patch costs less than the file's missing chunks: a rebuilt executable is
//! mostly new chunk by chunk, yet its patch from the previous build is a fraction of it.
//!
//! The patch list is not signed, so nothing in it is trusted: every piece is checked against
//! its name as it arrives, and the file the patch makes against the hash the signed tree gives
//! it. A patch that fails either check is refused (logged, counted) and the file is assembled
//! from its chunks like any other. A patch is applied a segment at a time: memory is the patch,
//! one region of the base and one segment of the file (`fleetcast_package::patch`).

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use fleetcast_events::manifest::FileEntry;
use fleetcast_events::patches::{Patch, PatchList};
use fleetcast_events::tree::{Hash32, TreeFile};
use fleetcast_events::v1::ChunkRef;
use fleetcast_package::chunking::ChunkId;
use fleetcast_package::patch::PatchError;
use futures::StreamExt;

use crate::assemble::{AssembleError, AssembleReport, ChunkSource, LocalChunks};

/// Why a patch was not used.
enum Failed {
    /// Bad or unreachable pieces, a base that changed on disk, a result that is not the file:
    /// the file comes from its chunks. `wire` is what the attempt fetched.
    Refused { wire: u64, reason: String },
    /// The version folder could not be written: the assembly fails as it would for chunks.
    Write(AssembleError),
}

/// Makes every file of `files` that a listed patch from an installed file makes more cheaply
/// than its missing chunks, in the `partial` folder. Returns the paths made.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn apply_patches<'a>(
    partial: &Path,
    files: &'a [TreeFile],
    listed: &[&[ChunkRef]],
    local: &LocalChunks,
    list: &PatchList,
    remote: &impl ChunkSource,
    concurrency: usize,
    report: &mut AssembleReport,
) -> Result<HashSet<&'a str>, AssembleError> {
    let mut made = HashSet::new();
    if list.patches.is_empty() {
        return Ok(made);
    }
    for (file, chunks) in files.iter().zip(listed) {
        let entry = &file.entry;
        if entry.link.is_some() || local.same_file(entry).is_some() {
            continue;
        }
        let Ok(hash) = Hash32::from_hex(&entry.blake3) else {
            continue;
        };
        // What chunks would cost: those no installed version holds (uncompressed, so at least
        // their stored size).
        let missing: u64 = chunks
            .iter()
            .filter(|c| ChunkId::from_hex(&c.id).is_ok_and(|id| !local.has_chunk(&id)))
            .map(|c| u64::from(c.len))
            .sum();
        // The smallest patch from a file this host holds, if it beats the chunks both as
        // the distributor measured them (stored) and as this host lacks them.
        let Some((patch, base)) = list
            .making(&hash)
            .filter(|p| p.len < p.delta.min(missing))
            .filter_map(|p| Some((p, local.file(&p.base.to_hex())?)))
            .min_by_key(|(p, _)| p.len)
        else {
            continue;
        };
        match apply_one(partial, entry, patch, base, remote, concurrency).await {
            Ok(wire) => {
                report.patched_files += 1;
                report.patch_bytes += wire;
                report.fetched_bytes += wire;
                made.insert(entry.path.as_str());
            }
            Err(Failed::Refused { wire, reason }) => {
                report.refused_patches += 1;
                report.patch_bytes += wire;
                report.fetched_bytes += wire;
                tracing::warn!(path = %entry.path, %reason, "patch refused; the file comes from its chunks");
            }
            Err(Failed::Write(e)) => return Err(e),
        }
    }
    Ok(made)
}

async fn apply_one(
    partial: &Path,
    entry: &FileEntry,
    patch: &Patch,
    base: &Path,
    remote: &impl ChunkSource,
    concurrency: usize,
) -> Result<u64, Failed> {
    let ids: Vec<(ChunkId, u32)> = patch
        .pieces
        .iter()
        .map(|p| (ChunkId(p.id.0), p.len))
        .collect();
    // A batch of pieces at a time (a plain loop: the agent's tasks must stay `Send`).
    let mut fetched = Vec::with_capacity(ids.len());
    for batch in ids.chunks(concurrency.max(1)) {
        let mut inflight = futures::stream::FuturesOrdered::new();
        for (id, len) in batch {
            inflight.push_back(remote.fetch(id, *len));
        }
        while let Some(piece) = inflight.next().await {
            fetched.push(piece);
        }
    }
    let mut wire = 0;
    let mut bytes = Vec::with_capacity(patch.len as usize);
    let mut refused = None;
    for piece in fetched {
        match piece {
            Ok(f) => {
                wire += f.wire_bytes;
                bytes.extend_from_slice(f.chunk.data());
            }
            Err(e) => {
                refused.get_or_insert(e.to_string());
            }
        }
    }
    let refuse = |reason: String| Failed::Refused { wire, reason };
    if let Some(reason) = refused {
        return Err(refuse(reason));
    }
    let base_file =
        std::fs::File::open(base).map_err(|e| refuse(format!("{}: {e}", base.display())))?;
    let path = partial.join(&entry.path);
    let mut file = create_file(&path).map_err(Failed::Write)?;
    let size = entry.size;
    // Written as it is made, a segment at a time, and checked by the hash of what was written.
    let made = tokio::task::spawn_blocking(move || {
        fleetcast_package::patch::apply(&base_file, &bytes, size, &mut file).map(|h| (h, file))
    })
    .await;
    let write_failed = |source| {
        Failed::Write(AssembleError::Io {
            path: path.clone(),
            source,
        })
    };
    let failed = |failure: Failed| {
        // Nothing half made is left for the chunks' assembly to trust.
        let _ = std::fs::remove_file(&path);
        failure
    };
    let (hash, file) = match made {
        Ok(Ok(made)) => made,
        Ok(Err(PatchError::Write(source))) => return Err(failed(write_failed(source))),
        Ok(Err(e)) => return Err(failed(refuse(e.to_string()))),
        Err(e) => return Err(failed(refuse(format!("patch task failed: {e}")))),
    };
    if hash.to_hex().as_str() != entry.blake3 {
        return Err(failed(refuse(
            "the patched file does not match the signed manifest".into(),
        )));
    }
    let mode = std::fs::Permissions::from_mode(crate::isolation::installed_mode(entry.mode));
    file.set_permissions(mode).map_err(write_failed)?;
    Ok(wire)
}

/// Creates a file of the version being assembled; it is made read-only like every installed
/// file once written. (Durability comes once for the whole version, before its rename.)
fn create_file(path: &Path) -> Result<std::fs::File, AssembleError> {
    let io = |source| AssembleError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    // Never written through: what is there may be a link to an installed version's file.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    std::fs::File::create_new(path).map_err(io)
}
