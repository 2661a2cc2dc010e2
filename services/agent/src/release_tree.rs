//! Reading a release's file tree (`fleetcast_events::tree`) from its signed root: nodes the
//! installed versions hold are taken from disk, the others fetched from the store, a level at a
//! time with bounded concurrency, each checked against its name. An update whose files mostly
//! did not change fetches only the few nodes above the changed ones.
//!
//! Each installed version keeps the nodes of its tree in `meta/<v>/tree.nodes` (each node as a
//! 4-byte little-endian length and its bytes) and its root in `meta/<v>/tree.root`. Nodes are
//! hashed again when loaded, so a damaged file costs a fetch, never a wrong install.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleetcast_events::VerifiedManifest;
use fleetcast_events::manifest::TreeRoot;
use fleetcast_events::patches::PatchList;
use fleetcast_events::tree::{self, ChunkList, Hash32, NodeRef, TreeFile, Walk};
use fleetcast_package::chunking::ChunkId;
use futures::StreamExt;

use crate::assemble::{AssembleError, AssembleReport, ChunkSource, LocalChunks, assemble};
use crate::install::InstallRoot;

pub const NODES_FILE: &str = "tree.nodes";
pub const ROOT_FILE: &str = "tree.root";

/// Tree nodes at hand on this host, by name.
#[derive(Default)]
pub struct LocalNodes {
    nodes: HashMap<Hash32, Arc<Vec<u8>>>,
}

impl LocalNodes {
    /// Adds the nodes an installed version kept in `meta` (none if it kept none), and returns
    /// that version's files, read from them, when its whole tree is there.
    pub fn add_version(&mut self, meta: &Path) -> Option<Vec<TreeFile>> {
        let bytes = std::fs::read(meta.join(NODES_FILE)).ok()?;
        let mut rest = bytes.as_slice();
        while let Some((len, tail)) = rest.split_first_chunk::<4>() {
            let len = u32::from_le_bytes(*len) as usize;
            let Some((node, tail)) = (len <= tail.len()).then(|| tail.split_at(len)) else {
                break;
            };
            let r = NodeRef::of(node);
            self.nodes
                .entry(r.hash)
                .or_insert_with(|| Arc::new(node.to_vec()));
            rest = tail;
        }
        let root: TreeRoot =
            serde_json::from_slice(&std::fs::read(meta.join(ROOT_FILE)).ok()?).ok()?;
        tree::read_all(root.node().ok()?, root.files, |r| {
            self.nodes.get(&r.hash).map(|b| b.as_slice())
        })
        .ok()
    }

    fn get(&self, r: &NodeRef) -> Option<Arc<Vec<u8>>> {
        self.nodes
            .get(&r.hash)
            .filter(|b| b.len() == r.len as usize)
            .cloned()
    }
}

/// A release's files, every chunk list resolved, with what reading them cost.
pub struct TreeRead {
    pub files: Vec<TreeFile>,
    /// Every node of the tree, to keep with the installed version.
    pub nodes: Vec<Arc<Vec<u8>>>,
    pub fetched_nodes: u64,
    pub fetched_bytes: u64,
}

impl TreeRead {
    /// Keeps the tree with its installed version, so the next update fetches only what changed.
    pub fn keep(&self, meta: &Path, root: &TreeRoot) -> io::Result<()> {
        std::fs::create_dir_all(meta)?;
        let mut out = io::BufWriter::new(std::fs::File::create(meta.join(NODES_FILE))?);
        for node in &self.nodes {
            out.write_all(&(node.len() as u32).to_le_bytes())?;
            out.write_all(node)?;
        }
        out.flush()?;
        std::fs::write(meta.join(ROOT_FILE), serde_json::to_vec(root)?)
    }
}

/// What staging a version cost.
#[derive(Debug, Default, Clone)]
pub struct Staged {
    pub files: AssembleReport,
    /// Tree nodes fetched from the store, and their bytes as transferred.
    pub fetched_nodes: u64,
    pub node_bytes: u64,
    /// The release's patch list, when the host read one.
    pub patch_list_bytes: u64,
}

impl Staged {
    /// Everything taken from the store: tree nodes, the patch list, chunks and patches.
    pub fn fetched_bytes(&self) -> u64 {
        self.files.fetched_bytes + self.metadata_bytes()
    }

    /// What describes the release rather than its content: tree nodes and the patch list.
    pub fn metadata_bytes(&self) -> u64 {
        self.node_bytes + self.patch_list_bytes
    }
}

/// Stages the version `manifest` signed into `root`: reads its tree (what the installed
/// versions hold from disk, the rest from `remote`), assembles its files, and keeps its tree
/// for the next update.
pub async fn stage(
    root: &InstallRoot,
    manifest: &VerifiedManifest,
    remote: &impl ChunkSource,
    concurrency: usize,
    fetch_from: tokio::time::Instant,
) -> Result<Staged, AssembleError> {
    if root.version_dir(&manifest.version).is_dir() {
        return Ok(Staged::default());
    }
    // Where the time goes, at debug level: (step, milliseconds since the previous step).
    let mut steps = Steps::default();
    let mut nodes = LocalNodes::default();
    let mut local = LocalChunks::default();
    for v in root.installed() {
        if let Some(files) = nodes.add_version(&root.meta_dir(&v)) {
            local.add_version(&root.version_dir(&v), &files);
        }
    }
    steps.done("indexed");
    // What is already here was read while the rest of the fleet takes the announcement; the
    // store is asked only from `fetch_from` on (the agent's `fetch_delay`).
    tokio::time::sleep_until(fetch_from).await;
    steps.done("fetch_delay");
    let tree = read_tree(manifest, &nodes, remote, concurrency).await?;
    drop(nodes);
    steps.done("tree");
    // Patches start from installed files: a host with none has no use for the list.
    let (patches, list_bytes) = if local.is_empty() {
        (PatchList::default(), 0)
    } else {
        remote
            .patch_list(&manifest.tree.root)
            .await
            .unwrap_or_default()
    };
    steps.done("patch_list");
    let files = assemble(
        root,
        &manifest.version,
        &tree.files,
        &local,
        &patches,
        remote,
        concurrency,
    )
    .await?;
    steps.done("assembled");
    if let Err(e) = tree.keep(&root.meta_dir(&manifest.version), &manifest.tree) {
        tracing::warn!(error = %e, "release tree not kept; later updates will fetch more");
    }
    steps.done("tree_kept");
    tracing::debug!(steps = ?steps.taken, "staging took (ms)");
    Ok(Staged {
        files,
        fetched_nodes: tree.fetched_nodes,
        node_bytes: tree.fetched_bytes,
        patch_list_bytes: list_bytes,
    })
}

/// How long each step of a staging took, for the debug log.
struct Steps {
    last: std::time::Instant,
    taken: Vec<(&'static str, u128)>,
}

impl Default for Steps {
    fn default() -> Self {
        Steps {
            last: std::time::Instant::now(),
            taken: Vec::new(),
        }
    }
}

impl Steps {
    fn done(&mut self, step: &'static str) {
        let now = std::time::Instant::now();
        self.taken.push((step, (now - self.last).as_millis()));
        self.last = now;
    }
}

/// Why an installed version is not as its signed tree says (`apps[].verify_on_start`): it is
/// not started.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(
        "{version} has no signed tree kept on this host (installed by an older agent?), so it cannot be verified"
    )]
    NoTree { version: semver::Version },
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not in the signed tree")]
    Added { path: String },
    #[error("{path} differs from its signed hash, size, mode or link")]
    Differs { path: String },
    #[error("{path} is missing")]
    Missing { path: String },
}

/// A version folder as its signed tree says it must be (`apps[].verify_on_start`): checked
/// before each start of the app, so a file changed, removed or added on disk after install is
/// never run. The tree is the one the agent verified node by node at install and kept beside
/// the version, as trusted as the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledTree {
    dir: PathBuf,
    files: Vec<TreeFile>,
}

impl InstalledTree {
    pub fn load(root: &InstallRoot, version: &semver::Version) -> Result<Self, VerifyError> {
        let files = LocalNodes::default()
            .add_version(&root.meta_dir(version))
            .ok_or_else(|| VerifyError::NoTree {
                version: version.clone(),
            })?;
        Ok(InstalledTree {
            dir: root.version_dir(version),
            files,
        })
    }

    /// Every file, link and folder of the version against the tree: content hash, size and
    /// installed mode of each file, each link's target, nothing missing, nothing added.
    pub fn check(&self) -> Result<(), VerifyError> {
        use std::os::unix::fs::PermissionsExt;
        let mut expected: HashMap<&str, &fleetcast_events::FileEntry> = self
            .files
            .iter()
            .map(|f| (f.entry.path.as_str(), &f.entry))
            .collect();
        let mut folders = vec![self.dir.clone()];
        while let Some(folder) = folders.pop() {
            let in_folder = |source| VerifyError::Io {
                path: folder.clone(),
                source,
            };
            let entries = std::fs::read_dir(&folder).map_err(in_folder)?;
            for entry in entries {
                let path = entry.map_err(in_folder)?.path();
                // Walked down from `self.dir`: always under it.
                let rel = path
                    .strip_prefix(&self.dir)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .into_owned();
                let meta = std::fs::symlink_metadata(&path).map_err(|source| VerifyError::Io {
                    path: rel.clone().into(),
                    source,
                })?;
                if meta.is_dir() {
                    folders.push(path);
                    continue;
                }
                let Some(want) = expected.remove(rel.as_str()) else {
                    return Err(VerifyError::Added { path: rel });
                };
                let same = match &want.link {
                    Some(target) => {
                        std::fs::read_link(&path).is_ok_and(|t| t.as_os_str() == target.as_str())
                    }
                    None => {
                        meta.is_file()
                            && meta.len() == want.size
                            && meta.permissions().mode() & 0o7777
                                == crate::isolation::installed_mode(want.mode)
                            && hash_file(&path).is_ok_and(|h| h == want.blake3)
                    }
                };
                if !same {
                    return Err(VerifyError::Differs { path: rel });
                }
            }
        }
        match expected.keys().next() {
            Some(missing) => Err(VerifyError::Missing {
                path: missing.to_string(),
            }),
            None => Ok(()),
        }
    }
}

fn hash_file(path: &Path) -> io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(std::fs::File::open(path)?)?;
    Ok(hasher.finalize().to_hex().to_string())
}

fn malformed(e: tree::TreeError) -> AssembleError {
    AssembleError::BadTree(e.to_string())
}

/// Reads the tree `manifest` signed: local nodes first, the rest from `remote`.
pub async fn read_tree(
    manifest: &VerifiedManifest,
    local: &LocalNodes,
    remote: &impl ChunkSource,
    concurrency: usize,
) -> Result<TreeRead, AssembleError> {
    let mut read = TreeRead {
        files: Vec::new(),
        nodes: Vec::new(),
        fetched_nodes: 0,
        fetched_bytes: 0,
    };
    let root = manifest.tree.node().map_err(malformed)?;
    let mut walk = Walk::files(root, manifest.tree.files);
    walk_all(&mut walk, local, remote, concurrency, &mut read).await?;
    let mut files = walk.into_files(manifest.tree.files).map_err(malformed)?;
    for file in &mut files {
        if let ChunkList::Tree { root, count } = file.chunks {
            let mut walk = Walk::chunks(root, count);
            walk_all(&mut walk, local, remote, concurrency, &mut read).await?;
            file.chunks = ChunkList::Listed(walk.into_chunks().map_err(malformed)?);
        }
    }
    read.files = files;
    Ok(read)
}

async fn walk_all(
    walk: &mut Walk,
    local: &LocalNodes,
    remote: &impl ChunkSource,
    concurrency: usize,
    read: &mut TreeRead,
) -> Result<(), AssembleError> {
    while !walk.wanted().is_empty() {
        let wanted = walk.wanted().to_vec();
        let got: Vec<_> = futures::stream::iter(wanted.into_iter().map(|r| node(local, remote, r)))
            .buffered(concurrency.max(1))
            .collect()
            .await;
        let mut level = Vec::with_capacity(got.len());
        for result in got {
            let (node, wire) = result?;
            if let Some(wire) = wire {
                read.fetched_nodes += 1;
                read.fetched_bytes += wire;
            }
            level.push(node);
        }
        walk.supply(&level.iter().map(|n| n.as_slice()).collect::<Vec<_>>())
            .map_err(malformed)?;
        read.nodes.extend(level);
    }
    Ok(())
}

/// One node: from disk if an installed version has it, else fetched (with its wire size).
async fn node(
    local: &LocalNodes,
    remote: &impl ChunkSource,
    r: NodeRef,
) -> Result<(Arc<Vec<u8>>, Option<u64>), AssembleError> {
    if let Some(node) = local.get(&r) {
        return Ok((node, None));
    }
    let fetched = remote.fetch(&ChunkId(r.hash.0), r.len).await?;
    Ok((
        Arc::new(fetched.chunk.into_data()),
        Some(fetched.wire_bytes),
    ))
}
