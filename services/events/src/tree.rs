//! A release's files as a content-addressed tree (the shape of a prolly tree): the signed
//! manifest names only the root node; each node is stored like a chunk, under the BLAKE3 of its
//! bytes, so a reader verifies every node it fetches and fetches only the nodes it does not
//! already hold. Ten changed files out of thousands change ten leaves and the few branches above
//! them; the rest of the metadata is shared with the installed version. `docs/tree.md` documents
//! the encoding byte by byte.
//!
//! - **Leaves** list files in path order (path, mode, size, BLAKE3, link, chunk list), or, for a
//!   file with many chunks, that file's chunks.
//! - **Branches** list their children (hash and byte length), all one level down.
//! - **Where nodes end** depends only on the keys (a path's or a chunk's hash), never on
//!   position: an item ends a node at level L when its key's hash has 3·(L+1) trailing zero bits
//!   (on average 8 items per leaf, 8 children per branch). Inserting or changing one file
//!   changes its leaf and the branches above it, nothing else. A node that grows too big ends
//!   early, so every node stays far under a chunk's maximum size.

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::manifest::{FileEntry, check_relative_path};
use crate::v1::ChunkRef;

/// A file with more chunks than this keeps them in a tree of their own, so a file of any size
/// costs its leaf a fixed few bytes.
pub const MAX_INLINE_CHUNKS: usize = 64;
/// Soft bound on a node's encoded size: a node is ended once its items pass it.
const NODE_TARGET_BYTES: usize = 48 * 1024;
/// Hard bound on a node's item count.
const MAX_NODE_ITEMS: usize = 1024;
/// A node bigger than this is refused on reading (nodes are written far below it).
pub const MAX_NODE_BYTES: usize = 256 * 1024;
/// Nodes hold 2^FANOUT_BITS items on average. Small nodes keep an edit's cost small (an edited
/// file costs its leaf and one branch per level); 8 measured about half the metadata of 16 for
/// ten edits among 3,000 files, at the price of more (concurrently fetched) nodes.
const FANOUT_BITS: u32 = 3;
/// Deeper trees than this are refused: 16^16 items is beyond any package.
const MAX_LEVEL: u8 = 16;

/// A node's name: the BLAKE3 of its bytes, and how many bytes it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeRef {
    pub hash: Hash32,
    pub len: u32,
}

impl NodeRef {
    pub fn of(bytes: &[u8]) -> Self {
        NodeRef {
            hash: Hash32(*blake3::hash(bytes).as_bytes()),
            len: bytes.len() as u32,
        }
    }
}

/// 32 raw bytes on the wire (a msgpack `bin 8`), hex when shown.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash32(pub [u8; 32]);

impl Hash32 {
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
    pub fn from_hex(hex: &str) -> Result<Self, TreeError> {
        blake3::Hash::from_hex(hex)
            .map(|h| Hash32(*h.as_bytes()))
            .map_err(|_| TreeError::Malformed(format!("{hex:?} is not a BLAKE3 hash")))
    }
    /// The key that places an item in the tree's shape.
    fn boundary_key(&self) -> u64 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(first)
    }
}

impl std::fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hash32({})", &self.to_hex()[..12])
    }
}

impl std::fmt::Display for Hash32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Hash32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Hash32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Bytes32;
        impl Visitor<'_> for Bytes32 {
            type Value = Hash32;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("32 bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Hash32, E> {
                <[u8; 32]>::try_from(v)
                    .map(Hash32)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_bytes(Bytes32)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    #[error("tree node {0} does not match its hash or length")]
    Hash(String),
    #[error("malformed tree: {0}")]
    Malformed(String),
}

/// How a file's content is cut into chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkList {
    Listed(Vec<ChunkRef>),
    /// Kept in a tree of its own (leaves of chunk references), `count` chunks long.
    Tree {
        root: NodeRef,
        count: u64,
    },
}

/// One file of a release, as the tree holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFile {
    pub entry: FileEntry,
    pub chunks: ChunkList,
}

impl TreeFile {
    /// A symbolic link: its size, hash and (no) chunks are those of its target's text.
    pub fn link(path: String, target: String) -> Self {
        TreeFile {
            entry: FileEntry {
                path,
                mode: 0o777,
                size: target.len() as u64,
                blake3: blake3::hash(target.as_bytes()).to_hex().to_string(),
                link: Some(target),
            },
            chunks: ChunkList::Listed(Vec::new()),
        }
    }
}

// ---- the encoding (msgpack, every struct as an array; see docs/tree.md) ----

const KIND_FILES: u8 = 0;
const KIND_CHUNKS: u8 = 1;
const KIND_BRANCH: u8 = 2;

#[derive(Serialize, Deserialize)]
struct Node {
    kind: u8,
    /// 0 for leaves; a branch's children are one level down.
    level: u8,
    files: Vec<FileItem>,
    chunks: Vec<ChunkItem>,
    children: Vec<ChildItem>,
}

#[derive(Serialize, Deserialize)]
struct FileItem {
    /// Bytes shared with the previous path of the same leaf (0 for its first).
    prefix: u32,
    suffix: String,
    mode: u32,
    size: u64,
    hash: Hash32,
    link: Option<String>,
    /// Empty for a file that is one chunk (its chunk is the file: same hash and length), an
    /// empty file, a link, or a file whose chunks are in `chunk_tree`.
    chunks: Vec<ChunkItem>,
    chunk_tree: Option<(Hash32, u32, u64)>,
}

#[derive(Serialize, Deserialize)]
struct ChunkItem(Hash32, u32);

#[derive(Serialize, Deserialize)]
struct ChildItem(Hash32, u32);

fn encode(node: &Node) -> Vec<u8> {
    // Writing msgpack into a Vec fails only on a type serde cannot express; ours are fixed.
    rmp_serde::to_vec(node).unwrap_or_default()
}

fn decode(node: &NodeRef, bytes: &[u8]) -> Result<Node, TreeError> {
    if bytes.len() > MAX_NODE_BYTES || NodeRef::of(bytes) != *node {
        return Err(TreeError::Hash(node.hash.to_hex()));
    }
    let decoded: Node = rmp_serde::from_slice(bytes)
        .map_err(|e| TreeError::Malformed(format!("node {}: {e}", node.hash)))?;
    let shape_ok = match decoded.kind {
        KIND_FILES => decoded.level == 0 && decoded.chunks.is_empty(),
        KIND_CHUNKS => decoded.level == 0 && decoded.files.is_empty(),
        KIND_BRANCH => decoded.level > 0 && decoded.files.is_empty() && decoded.chunks.is_empty(),
        _ => false,
    };
    if !shape_ok || (decoded.kind != KIND_BRANCH && !decoded.children.is_empty()) {
        return Err(TreeError::Malformed(format!(
            "node {} mixes kinds",
            node.hash
        )));
    }
    Ok(decoded)
}

// ---- building ----

/// A built tree: its root and every node, each after the nodes it names (store them in this
/// order and a stored node's children are always there before it).
#[derive(Debug, Clone)]
pub struct Built {
    pub root: NodeRef,
    pub nodes: Vec<(NodeRef, Vec<u8>)>,
}

/// Cuts a sequence of items into nodes level by level.
struct Levels {
    nodes: Vec<(NodeRef, Vec<u8>)>,
}

impl Levels {
    /// Ends the node being filled and returns its reference.
    fn emit(&mut self, node: Node) -> NodeRef {
        let bytes = encode(&node);
        let r = NodeRef::of(&bytes);
        self.nodes.push((r, bytes));
        r
    }

    /// Builds the branches above `leaves` (each with the key of its last item) up to one root.
    fn branches(&mut self, mut level: Vec<(NodeRef, u64)>) -> NodeRef {
        let mut depth = 1u8;
        while level.len() > 1 {
            let mut above = Vec::new();
            let mut children = Vec::new();
            let last = level.len() - 1;
            for (i, (child, key)) in level.into_iter().enumerate() {
                children.push(ChildItem(child.hash, child.len));
                if ends_node(key, depth) || children.len() >= MAX_NODE_ITEMS || i == last {
                    let node = Node {
                        kind: KIND_BRANCH,
                        level: depth,
                        files: Vec::new(),
                        chunks: Vec::new(),
                        children: std::mem::take(&mut children),
                    };
                    above.push((self.emit(node), key));
                }
            }
            level = above;
            depth += 1;
        }
        level.first().map_or_else(
            || {
                self.emit(Node {
                    kind: KIND_FILES,
                    level: 0,
                    files: Vec::new(),
                    chunks: Vec::new(),
                    children: Vec::new(),
                })
            },
            |(r, _)| *r,
        )
    }
}

/// Whether an item with this key ends its node at `level`.
fn ends_node(key: u64, level: u8) -> bool {
    key.trailing_zeros() >= FANOUT_BITS * (u32::from(level) + 1)
}

fn path_key(path: &str) -> u64 {
    Hash32(*blake3::hash(path.as_bytes()).as_bytes()).boundary_key()
}

fn common_prefix(a: &str, b: &str) -> usize {
    let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    // Never split a UTF-8 character: both texts must stay valid strings.
    (0..=n).rev().find(|&i| b.is_char_boundary(i)).unwrap_or(0)
}

/// Builds the tree of `files`, which must be in strictly increasing path order (byte order).
pub fn build(files: &[TreeFile]) -> Result<Built, TreeError> {
    let mut levels = Levels { nodes: Vec::new() };
    let mut leaves: Vec<(NodeRef, u64)> = Vec::new();
    let mut items: Vec<FileItem> = Vec::new();
    let mut bytes = 0usize;
    let mut previous: Option<&str> = None;
    for (i, file) in files.iter().enumerate() {
        let path = file.entry.path.as_str();
        if previous.is_some_and(|p| p >= path) {
            return Err(TreeError::Malformed(format!(
                "{path} is out of order or listed twice"
            )));
        }
        let hash = Hash32::from_hex(&file.entry.blake3)?;
        let (chunks, chunk_tree) = match &file.chunks {
            ChunkList::Listed(list) if list.len() > MAX_INLINE_CHUNKS => {
                let tree = build_chunks(&mut levels, list)?;
                (Vec::new(), Some((tree.hash, tree.len, list.len() as u64)))
            }
            ChunkList::Listed(list) => {
                let whole = list.len() == 1
                    && list[0].id == file.entry.blake3
                    && u64::from(list[0].len) == file.entry.size;
                let items = if whole {
                    Vec::new()
                } else {
                    list.iter()
                        .map(|c| Ok(ChunkItem(Hash32::from_hex(&c.id)?, c.len)))
                        .collect::<Result<_, TreeError>>()?
                };
                (items, None)
            }
            ChunkList::Tree { root, count } => (Vec::new(), Some((root.hash, root.len, *count))),
        };
        let prefix = match previous {
            Some(p) if !items.is_empty() => common_prefix(p, path),
            _ => 0,
        };
        bytes += path.len() - prefix + 64 + chunks.len() * 40;
        items.push(FileItem {
            prefix: prefix as u32,
            suffix: path[prefix..].to_string(),
            mode: file.entry.mode,
            size: file.entry.size,
            hash,
            link: file.entry.link.clone(),
            chunks,
            chunk_tree,
        });
        previous = Some(path);
        let key = path_key(path);
        let full = bytes >= NODE_TARGET_BYTES || items.len() >= MAX_NODE_ITEMS;
        if ends_node(key, 0) || full || i + 1 == files.len() {
            let node = Node {
                kind: KIND_FILES,
                level: 0,
                files: std::mem::take(&mut items),
                chunks: Vec::new(),
                children: Vec::new(),
            };
            leaves.push((levels.emit(node), key));
            bytes = 0;
        }
    }
    let root = levels.branches(leaves);
    Ok(Built {
        root,
        nodes: levels.nodes,
    })
}

fn build_chunks(levels: &mut Levels, list: &[ChunkRef]) -> Result<NodeRef, TreeError> {
    let mut leaves = Vec::new();
    let mut items = Vec::new();
    for (i, c) in list.iter().enumerate() {
        let id = Hash32::from_hex(&c.id)?;
        items.push(ChunkItem(id, c.len));
        let key = id.boundary_key();
        if ends_node(key, 0) || items.len() >= MAX_NODE_ITEMS || i + 1 == list.len() {
            let node = Node {
                kind: KIND_CHUNKS,
                level: 0,
                files: Vec::new(),
                chunks: std::mem::take(&mut items),
                children: Vec::new(),
            };
            leaves.push((levels.emit(node), key));
        }
    }
    Ok(levels.branches(leaves))
}

// ---- reading ----

/// Reads a tree level by level, so a reader can fetch each level's missing nodes at once:
/// [`Walk::wanted`] names the nodes of the next level, [`Walk::supply`] takes them (checked
/// against their names) and expands them. Bounded by the signed totals: a tree that lists more
/// files (or chunks) than the manifest says is refused as soon as it does.
pub struct Walk {
    leaf_kind: u8,
    frontier: Vec<NodeRef>,
    /// The level the frontier's nodes must have; unknown for the root.
    level: Option<u8>,
    files: Vec<TreeFile>,
    chunks: Vec<ChunkRef>,
    max_items: u64,
}

impl Walk {
    /// A walk of a release's files from `root`, refusing more than `max_files`.
    pub fn files(root: NodeRef, max_files: u64) -> Self {
        Walk::new(KIND_FILES, root, max_files)
    }

    /// A walk of one file's chunk list, which must have `count` chunks.
    pub fn chunks(root: NodeRef, count: u64) -> Self {
        Walk::new(KIND_CHUNKS, root, count)
    }

    fn new(leaf_kind: u8, root: NodeRef, max_items: u64) -> Self {
        Walk {
            leaf_kind,
            frontier: vec![root],
            level: None,
            files: Vec::new(),
            chunks: Vec::new(),
            max_items,
        }
    }

    /// The nodes to supply next, in order; empty when the walk is complete.
    pub fn wanted(&self) -> &[NodeRef] {
        &self.frontier
    }

    /// Takes the bytes of every wanted node, in the order [`Walk::wanted`] gave them.
    pub fn supply<B: AsRef<[u8]>>(&mut self, nodes: &[B]) -> Result<(), TreeError> {
        if nodes.len() != self.frontier.len() {
            return Err(TreeError::Malformed(
                "wrong number of nodes supplied".into(),
            ));
        }
        let frontier = std::mem::take(&mut self.frontier);
        for (r, bytes) in frontier.iter().zip(nodes) {
            let node = decode(r, bytes.as_ref())?;
            let level = *self.level.get_or_insert(node.level);
            if node.level != level || level > MAX_LEVEL {
                return Err(TreeError::Malformed(format!(
                    "node {} at the wrong level",
                    r.hash
                )));
            }
            if node.kind == KIND_BRANCH {
                let children = node.children.iter().map(|c| NodeRef {
                    hash: c.0,
                    len: c.1,
                });
                self.frontier.extend(children);
            } else if node.kind == self.leaf_kind {
                self.expand(node)?;
            } else {
                return Err(TreeError::Malformed(format!(
                    "node {} is not of this tree",
                    r.hash
                )));
            }
            let items = (self.files.len() + self.chunks.len() + self.frontier.len()) as u64;
            if items > self.max_items.max(1) {
                return Err(TreeError::Malformed(format!(
                    "the tree lists more than the {} items signed",
                    self.max_items
                )));
            }
        }
        self.level = self.level.map(|l| l.saturating_sub(1));
        Ok(())
    }

    fn expand(&mut self, node: Node) -> Result<(), TreeError> {
        self.chunks
            .extend(node.chunks.into_iter().map(|ChunkItem(id, len)| ChunkRef {
                id: id.to_hex(),
                len,
            }));
        let mut previous = String::new();
        for (n, item) in node.files.into_iter().enumerate() {
            let prefix = item.prefix as usize;
            if (n == 0 && prefix != 0)
                || !previous.is_char_boundary(prefix.min(previous.len()))
                || prefix > previous.len()
            {
                return Err(TreeError::Malformed(
                    "a path's shared prefix is out of range".into(),
                ));
            }
            let path = format!("{}{}", &previous[..prefix], item.suffix);
            check_relative_path(&path).map_err(|e| TreeError::Malformed(e.to_string()))?;
            if self.files.last().is_some_and(|f| f.entry.path >= path) {
                return Err(TreeError::Malformed(format!(
                    "{path} is out of order or listed twice"
                )));
            }
            let hash = item.hash.to_hex();
            let chunks = match item.chunk_tree {
                Some((root, len, count)) => ChunkList::Tree {
                    root: NodeRef { hash: root, len },
                    count,
                },
                None if item.chunks.is_empty() && item.link.is_none() && item.size > 0 => {
                    let len = u32::try_from(item.size).map_err(|_| {
                        TreeError::Malformed(format!("{path} is one chunk of {} bytes", item.size))
                    })?;
                    ChunkList::Listed(vec![ChunkRef {
                        id: hash.clone(),
                        len,
                    }])
                }
                None => ChunkList::Listed(
                    item.chunks
                        .into_iter()
                        .map(|ChunkItem(id, len)| ChunkRef {
                            id: id.to_hex(),
                            len,
                        })
                        .collect(),
                ),
            };
            self.files.push(TreeFile {
                entry: FileEntry {
                    path: path.clone(),
                    mode: item.mode,
                    size: item.size,
                    blake3: hash,
                    link: item.link,
                },
                chunks,
            });
            previous = path;
        }
        Ok(())
    }

    fn complete(&self) -> Result<(), TreeError> {
        if self.frontier.is_empty() {
            Ok(())
        } else {
            Err(TreeError::Malformed("the walk is not complete".into()))
        }
    }

    /// The files, in path order, once every node was supplied; exactly `expected` of them.
    pub fn into_files(self, expected: u64) -> Result<Vec<TreeFile>, TreeError> {
        self.complete()?;
        if self.files.len() as u64 != expected {
            return Err(TreeError::Malformed(format!(
                "the tree lists {} files, the manifest {expected}",
                self.files.len()
            )));
        }
        Ok(self.files)
    }

    /// The chunks, in order, once every node was supplied; exactly the count the file named.
    pub fn into_chunks(self) -> Result<Vec<ChunkRef>, TreeError> {
        self.complete()?;
        if self.chunks.len() as u64 != self.max_items {
            return Err(TreeError::Malformed(format!(
                "a chunk tree lists {} chunks, its file {}",
                self.chunks.len(),
                self.max_items
            )));
        }
        Ok(self.chunks)
    }
}

/// The nodes a node names: a branch's children, a file leaf's chunk trees. Unchecked: for
/// tools that copy or count a tree; a reader checks what it reads with [`Walk`].
pub fn children(bytes: &[u8]) -> Result<Vec<NodeRef>, TreeError> {
    let node: Node =
        rmp_serde::from_slice(bytes).map_err(|e| TreeError::Malformed(e.to_string()))?;
    let branches = node.children.iter().map(|c| NodeRef {
        hash: c.0,
        len: c.1,
    });
    let chunk_trees = node
        .files
        .iter()
        .filter_map(|f| f.chunk_tree.map(|(hash, len, _)| NodeRef { hash, len }));
    Ok(branches.chain(chunk_trees).collect())
}

/// Walks a tree whose nodes are all at hand (`get` finds them by name): a test's or a cache's
/// view, chunk lists resolved.
pub fn read_all<'a>(
    root: NodeRef,
    files: u64,
    get: impl Fn(&NodeRef) -> Option<&'a [u8]>,
) -> Result<Vec<TreeFile>, TreeError> {
    let lookup = |wanted: &[NodeRef]| -> Result<Vec<&'a [u8]>, TreeError> {
        wanted
            .iter()
            .map(|r| get(r).ok_or_else(|| TreeError::Malformed(format!("node {} missing", r.hash))))
            .collect()
    };
    let mut walk = Walk::files(root, files);
    while !walk.wanted().is_empty() {
        let got = lookup(walk.wanted())?;
        walk.supply(&got)?;
    }
    let mut out = walk.into_files(files)?;
    for file in &mut out {
        if let ChunkList::Tree { root, count } = file.chunks {
            let mut walk = Walk::chunks(root, count);
            while !walk.wanted().is_empty() {
                let got = lookup(walk.wanted())?;
                walk.supply(&got)?;
            }
            file.chunks = ChunkList::Listed(walk.into_chunks()?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn file(path: &str, content: &[u8]) -> TreeFile {
        let hash = blake3::hash(content).to_hex().to_string();
        TreeFile {
            entry: FileEntry {
                path: path.into(),
                mode: 0o644,
                size: content.len() as u64,
                blake3: hash.clone(),
                link: None,
            },
            chunks: ChunkList::Listed(if content.is_empty() {
                vec![]
            } else {
                vec![ChunkRef {
                    id: hash,
                    len: content.len() as u32,
                }]
            }),
        }
    }

    fn release(n: usize, edit: &[usize]) -> Vec<TreeFile> {
        let mut files: Vec<TreeFile> = (0..n)
            .map(|i| {
                let body = if edit.contains(&i) {
                    format!("edited {i}")
                } else {
                    format!("body {i}")
                };
                file(
                    &format!("src/mod_{:02}/file_{i:05}.rs", i % 37),
                    body.as_bytes(),
                )
            })
            .collect();
        files.sort_by(|a, b| a.entry.path.cmp(&b.entry.path));
        files
    }

    fn all(built: &Built) -> HashMap<Hash32, Vec<u8>> {
        built
            .nodes
            .iter()
            .map(|(r, b)| (r.hash, b.clone()))
            .collect()
    }

    fn read_all(
        root: NodeRef,
        files: u64,
        nodes: &HashMap<Hash32, Vec<u8>>,
    ) -> Result<Vec<TreeFile>, TreeError> {
        super::read_all(root, files, |r| nodes.get(&r.hash).map(Vec::as_slice))
    }

    #[test]
    fn a_tree_reads_back_as_built() {
        let mut files = release(3000, &[]);
        // A big file keeps its chunks in a tree of its own; a link and an empty file too.
        let chunks: Vec<ChunkRef> = (0..500u32)
            .map(|i| ChunkRef {
                id: blake3::hash(&i.to_le_bytes()).to_hex().to_string(),
                len: 65536,
            })
            .collect();
        files.push(TreeFile {
            entry: FileEntry {
                path: "zz/big.bin".into(),
                mode: 0o755,
                size: 500 * 65536,
                blake3: blake3::hash(b"big").to_hex().to_string(),
                link: None,
            },
            chunks: ChunkList::Listed(chunks),
        });
        files.push(file("zz/empty", b""));
        let mut link = file("zz/link", b"big.bin");
        link.entry.link = Some("big.bin".into());
        link.chunks = ChunkList::Listed(vec![]);
        files.push(link);
        let built = build(&files).expect("build");
        let read = read_all(built.root, files.len() as u64, &all(&built)).expect("read");
        assert_eq!(read, files);
        assert!(built.nodes.iter().all(|(_, b)| b.len() < MAX_NODE_BYTES));
        assert_eq!(
            build(&files).expect("again").root,
            built.root,
            "deterministic"
        );
    }

    #[test]
    fn ten_edited_files_change_a_few_small_nodes() {
        let v1 = build(&release(3000, &[])).expect("v1");
        let edits = [5, 400, 401, 900, 1500, 1501, 2000, 2500, 2800, 2999];
        let v2 = build(&release(3000, &edits)).expect("v2");
        let old: std::collections::HashSet<Hash32> = v1.nodes.iter().map(|(r, _)| r.hash).collect();
        let new: Vec<usize> = v2
            .nodes
            .iter()
            .filter(|(r, _)| !old.contains(&r.hash))
            .map(|(_, b)| b.len())
            .collect();
        let bytes: usize = new.iter().sum();
        let total: usize = v2.nodes.iter().map(|(_, b)| b.len()).sum();
        assert!(new.len() <= 3 * edits.len(), "{} new nodes", new.len());
        assert!(
            bytes * 10 < total,
            "{bytes} of {total} metadata bytes are new"
        );
        eprintln!("{} new nodes, {bytes} of {total} bytes", new.len());
    }

    #[test]
    fn tampered_out_of_order_and_oversized_trees_are_refused() {
        let files = release(200, &[]);
        let built = build(&files).expect("build");
        let mut nodes = all(&built);
        // A node whose bytes do not match its name.
        let (leaf, _) = built.nodes[0];
        if let Some(bytes) = nodes.get_mut(&leaf.hash) {
            bytes[10] ^= 1;
        }
        assert!(matches!(
            read_all(built.root, 200, &nodes),
            Err(TreeError::Hash(_))
        ));
        // More files than signed.
        assert!(read_all(built.root, 199, &all(&built)).is_err());
        // Out of order at build time.
        let mut swapped = files.clone();
        swapped.swap(3, 4);
        assert!(build(&swapped).is_err());
        // A signed tree whose node names a path that climbs out is refused on reading.
        let hostile = build(&[file("../etc/passwd", b"x")]).expect("build");
        assert!(matches!(
            read_all(hostile.root, 1, &all(&hostile)),
            Err(TreeError::Malformed(_))
        ));
    }
}
