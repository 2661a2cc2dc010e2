//! What the fuzz targets share: the fixed test signing key and clock, and the property checks
//! each target runs on one input. The targets in `fuzz_targets/` only hand libFuzzer's bytes
//! to these functions, so `make-corpus` can run every seed through the same code once.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::OnceLock;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use fleetcast_events::manifest::check_relative_path;
use fleetcast_events::tree::{self, ChunkList, NodeRef, TreeError, Walk};
use fleetcast_events::v1;
use fleetcast_events::{
    Encoding, Manifest, SecretKey, SignedManifest, SignedMetadata, TrustedKeys, TrustedRoot,
};
use fleetcast_package::chunking::{self, ChunkId, MAX_CHUNK};
use fleetcast_package::{ArchiveLimits, Package};
use time::OffsetDateTime;

/// The fuzzing key: 32 bytes of 7 as the seed. Test data only; it signs the seed manifests.
pub const TEST_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

pub fn test_key() -> &'static SecretKey {
    static KEY: OnceLock<SecretKey> = OnceLock::new();
    KEY.get_or_init(|| SecretKey::from_text(TEST_KEY).expect("the test key parses"))
}

/// A fixed "now" (2026-01-01T00:00:00Z), so an input behaves the same on every run.
pub fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_767_225_600).expect("a valid instant")
}

/// Archive validation: whatever the bytes, `Package::open` and everything a valid package
/// offers (file tree, package config, entry readers) return errors, never panic, and stay
/// within the declared sizes; the files of an accepted package build into a tree that reads
/// back as them.
pub fn archive(data: &[u8]) {
    // One unnamed temporary file per process (nothing left behind when libFuzzer exits),
    // reopened by path through /proc (Linux) since `Package::open` takes a path.
    static FILE: OnceLock<std::fs::File> = OnceLock::new();
    let mut file = FILE.get_or_init(|| tempfile::tempfile().expect("a temporary file"));
    file.set_len(0).expect("truncate");
    file.seek(SeekFrom::Start(0)).expect("seek");
    file.write_all(data).expect("write");
    let path = std::path::PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(file)
    ));
    let Ok(mut package) = Package::open(&path, &ArchiveLimits::default()) else {
        return;
    };
    let entries = package.entries().to_vec();
    for entry in &entries {
        assert!(
            check_relative_path(&entry.path).is_ok(),
            "accepted an unsafe path {:?}",
            entry.path
        );
    }
    if let Ok(files) = package.file_tree() {
        for f in &files {
            let entry = entries.iter().find(|e| e.path == f.entry.path);
            assert!(
                entry.is_some(),
                "tree lists {:?}, not an entry",
                f.entry.path
            );
        }
        let built = tree::build(&files)
            .unwrap_or_else(|e| panic!("the files of an accepted package build no tree: {e}"));
        let nodes: std::collections::HashMap<NodeRef, &[u8]> = built
            .nodes
            .iter()
            .map(|(r, bytes)| (*r, bytes.as_slice()))
            .collect();
        let read = tree::read_all(built.root, files.len() as u64, |r| nodes.get(r).copied());
        assert_eq!(
            read.as_ref(),
            Ok(&files),
            "a package's tree does not read back as its files"
        );
    }
    let _ = package.config();
    for entry in &entries {
        if let Ok(mut reader) = package.entry_reader(entry.index) {
            let mut sink = Vec::new();
            if reader.read_to_end(&mut sink).is_ok() {
                assert!(
                    sink.len() as u64 <= entry.size,
                    "read past the declared size"
                );
            }
        }
    }
}

/// `text` as a signed manifest carrying one signature by the test key. Built as JSON, the
/// wire form, so it does not depend on how the Rust side spells the signature type.
pub fn signed_json(text: &str) -> serde_json::Value {
    let key = test_key();
    serde_json::json!({
        "manifest": text,
        "signatures": [{
            "key_id": key.public().id(),
            "signature": B64.encode(key.sign(text.as_bytes())),
        }],
    })
}

fn sign_text(text: &str) -> SignedManifest {
    serde_json::from_value(signed_json(text)).expect("a signed manifest decodes")
}

/// Checks what a verified manifest promises, whatever text it came from.
fn check_verified(signed: &SignedManifest, keys: &TrustedKeys) {
    let Ok(verified) = signed.verify(keys, now()) else {
        return;
    };
    assert!(now() <= verified.expires, "accepted an expired manifest");
    // The paths are checked as the tree is read (the `tree` target); the root must be a node.
    assert!(
        verified.tree.node().is_ok(),
        "accepted a tree root that names no node: {:?}",
        verified.tree
    );
}

/// Manifest parsing and verification: a signed manifest decoded from JSON (and MessagePack, as
/// it travels inside desired states) verified against the test key; and the manifest text,
/// parsed directly and signed with the test key, so that the checks behind the signature
/// (parsing, expiry, app name, paths) see fuzzed text too, not only the signature check.
pub fn manifest(data: &[u8]) {
    let keys = TrustedKeys::new(vec![test_key().public()]);
    for encoding in [Encoding::Json, Encoding::MsgPack] {
        if let Ok(signed) = encoding.decode::<SignedManifest>(data) {
            let _ = signed.verify(&keys, now());
            check_verified(&signed, &keys);
            check_verified(&sign_text(&signed.manifest), &keys);
        }
    }
    let _ = Encoding::Json.decode::<Manifest>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        check_verified(&sign_text(text), &keys);
        trust_metadata(text, &keys);
    }
}

/// Roots and timestamps (the other signed metadata): the text as received, and re-signed with
/// the test key so the parsing and checks behind the signature run too. A root taken as the
/// first one must name valid keys and thresholds; no root is the next of itself.
fn trust_metadata(text: &str, keys: &TrustedKeys) {
    if let Ok(signed) = serde_json::from_str::<SignedMetadata>(text) {
        let _ = TrustedRoot::bootstrap(&signed);
        let _ = signed.verify_timestamp(keys, now());
    }
    let signed = SignedMetadata {
        signed: text.to_string(),
        signatures: vec![fleetcast_events::Signature::new(test_key(), text)],
    };
    if let Ok(timestamp) = signed.verify_timestamp(keys, now()) {
        assert!(now() <= timestamp.expires, "accepted an expired timestamp");
    }
    if let Ok(root) = TrustedRoot::bootstrap(&signed) {
        let signing = root
            .root()
            .signing
            .trusted()
            .expect("a taken root's signing role is valid");
        assert!(signing.threshold() >= 1);
        assert!(
            root.next(&signed).is_err(),
            "a root accepted as its own successor"
        );
    }
}

/// Decodes `data` as `T`; a value that decodes must encode again and decode to itself.
fn round_trip<T>(encoding: Encoding, data: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Ok(value) = encoding.decode::<T>(data) else {
        return;
    };
    let bytes = encoding
        .encode(&value)
        .unwrap_or_else(|e| panic!("{value:?} decoded but does not encode: {e}"));
    let again: T = encoding
        .decode(&bytes)
        .unwrap_or_else(|e| panic!("{value:?} does not decode after encoding: {e}"));
    assert_eq!(again, value, "changed by a round trip through {encoding:?}");
}

/// Event decoding: every type of `fleetcast_events::v1`, in both encodings.
pub fn event(data: &[u8]) {
    for encoding in [Encoding::Json, Encoding::MsgPack] {
        round_trip::<v1::ReleasePublished>(encoding, data);
        round_trip::<v1::PackageSource>(encoding, data);
        round_trip::<v1::PackageDetected>(encoding, data);
        round_trip::<v1::Rejection>(encoding, data);
        round_trip::<v1::RejectCode>(encoding, data);
        round_trip::<v1::PackageRejected>(encoding, data);
        round_trip::<v1::EventRejected>(encoding, data);
        round_trip::<v1::ReleaseSigned>(encoding, data);
        round_trip::<v1::RollbackRequested>(encoding, data);
        round_trip::<v1::RollbackSigned>(encoding, data);
        round_trip::<v1::ReleaseRejected>(encoding, data);
        round_trip::<v1::ReleaseStored>(encoding, data);
        round_trip::<v1::ReleaseState>(encoding, data);
        round_trip::<v1::ReleaseRecord>(encoding, data);
        round_trip::<v1::ChunkRef>(encoding, data);
        round_trip::<v1::DesiredState>(encoding, data);
        round_trip::<v1::SlotRequest>(encoding, data);
        round_trip::<v1::SlotReply>(encoding, data);
        round_trip::<v1::AppState>(encoding, data);
        round_trip::<v1::AgentStatus>(encoding, data);
        round_trip::<v1::AgentHeartbeat>(encoding, data);
        round_trip::<v1::AppHeartbeat>(encoding, data);
    }
}

/// Tree nodes and chunk verification. The bytes as a release's tree (`fleetcast_events::tree`)
/// that is this one node, read as agents read it: as the root of a release's files and as a
/// file's chunk tree, errors allowed but no panic; what reads completely lists safe paths in
/// strictly increasing order, names the nodes `tree::children` names, and builds into a tree
/// that reads back as the same files; bytes that do not match a node's name are refused. Then
/// the bytes as a stored chunk (tree nodes are stored like chunks), checked by
/// `chunking::verify` (never more than the maximum chunk size decompressed); and the bytes as
/// file content: chunked, stored and verified again, which must give them back.
pub fn tree(data: &[u8]) {
    tree_node(data);
    chunk(data);
}

/// The signed total a walk is bounded by: far more than any one node lists.
const MAX_ITEMS: u64 = 1_000_000;

/// A walk of the tree that is `data`'s node, `data` supplied as its root.
fn walk_of(data: &[u8], files: bool, bound: u64) -> (Walk, Result<(), TreeError>) {
    let root = NodeRef::of(data);
    let mut walk = if files {
        Walk::files(root, bound)
    } else {
        Walk::chunks(root, bound)
    };
    let supplied = walk.supply(&[data]);
    (walk, supplied)
}

/// A one-node walk that `data` completes with `bound` as the signed total.
fn complete_walk(data: &[u8], files: bool, bound: u64) -> Option<Walk> {
    let (walk, supplied) = walk_of(data, files, bound);
    (supplied.is_ok() && walk.wanted().is_empty()).then_some(walk)
}

/// How many items a complete one-node walk lists, found through the public API only: a walk
/// refuses a tree that lists more than its bound (and a bound of 0 counts as 1), so the least
/// bound the node passes is its count; each item takes bytes, so it is at most `data.len()`.
fn candidates(data: &[u8], files: bool) -> Vec<u64> {
    let (mut low, mut high) = (1u64, (data.len() as u64).clamp(1, MAX_ITEMS));
    while low < high {
        let mid = low + (high - low) / 2;
        if complete_walk(data, files, mid).is_some() {
            high = mid;
        } else {
            low = mid + 1;
        }
    }
    if low == 1 { vec![1, 0] } else { vec![low] }
}

fn tree_node(data: &[u8]) {
    let _ = tree::children(data);
    let name = NodeRef::of(data);
    for files in [true, false] {
        let (walk, supplied) = walk_of(data, files, MAX_ITEMS);
        if supplied.is_err() {
            continue;
        }
        let children = tree::children(data)
            .unwrap_or_else(|e| panic!("a node a walk read has no children: {e}"));
        if walk.wanted().is_empty() {
            // A leaf (or a branch without children): the whole tree.
            if files {
                check_files(data, &children);
            } else {
                check_chunks(data, &children);
            }
        } else {
            // A branch: it names its children, none of which is this node.
            assert_eq!(walk.wanted(), &children[..], "a branch's children differ");
            let mut walk = walk;
            let copies = vec![data; walk.wanted().len()];
            assert!(
                matches!(walk.supply(&copies), Err(TreeError::Hash(_))),
                "a node was taken for its child"
            );
        }
    }
    // Bytes that are not the node's: one more, one changed, or the right ones under a name
    // with another length.
    let mut longer = data.to_vec();
    longer.push(0);
    let mut changed = data.to_vec();
    if let Some(b) = changed.last_mut() {
        *b ^= 1;
    }
    let other_len = NodeRef {
        len: name.len.wrapping_add(1),
        ..name
    };
    for (r, bytes) in [(name, &longer[..]), (name, &changed[..]), (other_len, data)] {
        if bytes == data && r == name {
            continue;
        }
        for mut walk in [Walk::files(r, MAX_ITEMS), Walk::chunks(r, MAX_ITEMS)] {
            let refused = walk.supply(&[bytes]);
            assert!(
                matches!(refused, Err(TreeError::Hash(_))),
                "bytes that do not match the node's name were taken: {refused:?}"
            );
        }
    }
    // Too many or too few nodes.
    assert!(Walk::files(name, MAX_ITEMS).supply(&[data, data]).is_err());
    assert!(Walk::files(name, MAX_ITEMS).supply::<&[u8]>(&[]).is_err());
}

/// A leaf of files that reads completely: safe paths in strictly increasing order, its chunk
/// trees the children it names, and a tree built of its files reads back as them.
fn check_files(data: &[u8], children: &[NodeRef]) {
    let files = candidates(data, true)
        .into_iter()
        .find_map(|n| complete_walk(data, true, n)?.into_files(n).ok())
        .expect("a complete walk lists as many files as its least bound");
    for f in &files {
        assert!(
            check_relative_path(&f.entry.path).is_ok(),
            "the tree lists an unsafe path {:?}",
            f.entry.path
        );
    }
    for pair in files.windows(2) {
        assert!(
            pair[0].entry.path < pair[1].entry.path,
            "{:?} listed after {:?}",
            pair[1].entry.path,
            pair[0].entry.path
        );
    }
    let trees: Vec<NodeRef> = files
        .iter()
        .filter_map(|f| match f.chunks {
            ChunkList::Tree { root, .. } => Some(root),
            ChunkList::Listed(_) => None,
        })
        .collect();
    assert_eq!(children, &trees[..], "a leaf's chunk trees differ");
    // A file whose chunks are in a tree of their own needs that tree's nodes, not at hand; a
    // path longer than a zip name (64 KiB) could make a node too big to read, and no package
    // has one.
    if !trees.is_empty()
        || files
            .iter()
            .any(|f| f.entry.path.len() > usize::from(u16::MAX))
    {
        return;
    }
    let built = tree::build(&files).unwrap_or_else(|e| panic!("files read build no tree: {e}"));
    let nodes: std::collections::HashMap<NodeRef, &[u8]> = built
        .nodes
        .iter()
        .map(|(r, bytes)| (*r, bytes.as_slice()))
        .collect();
    let read = tree::read_all(built.root, files.len() as u64, |r| nodes.get(r).copied())
        .unwrap_or_else(|e| panic!("a tree built of files read does not read: {e}"));
    let entries =
        |files: &[tree::TreeFile]| files.iter().map(|f| f.entry.clone()).collect::<Vec<_>>();
    assert_eq!(
        entries(&read),
        entries(&files),
        "the files changed by a rebuild"
    );
}

/// A leaf of chunks that reads completely: chunk names that parse, no children.
fn check_chunks(data: &[u8], children: &[NodeRef]) {
    let chunks = candidates(data, false)
        .into_iter()
        .find_map(|n| complete_walk(data, false, n)?.into_chunks().ok())
        .expect("a complete walk lists as many chunks as its least bound");
    for c in &chunks {
        let id = ChunkId::from_hex(&c.id).unwrap_or_else(|e| panic!("chunk {:?}: {e}", c.id));
        assert_eq!(id.to_hex(), c.id);
    }
    assert!(children.is_empty(), "a leaf of chunks names nodes");
}

/// The bytes as a stored chunk and as file content.
fn chunk(data: &[u8]) {
    // As a stored chunk: its length the first four bytes say, its name that of the bytes.
    let len = data
        .get(..4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if let Ok(chunk) = chunking::verify(&ChunkId::of(data), len, data) {
        assert!(chunk.data().len() <= MAX_CHUNK);
    }
    if let Some((1, frame)) = data.split_first()
        && let Ok(raw) = zstd::bulk::decompress(frame, MAX_CHUNK)
    {
        // A stored zstd chunk whose content is known: it must verify under its own name.
        let ok = chunking::verify(&ChunkId::of(&raw), raw.len() as u32, data);
        assert!(ok.is_ok(), "a valid zstd chunk was refused: {ok:?}");
    }
    for piece in chunking::chunks(data) {
        let (id, content) = piece.expect("chunking a slice cannot fail");
        assert!(content.len() <= MAX_CHUNK);
        let stored = chunking::encode_stored(&content).expect("encode");
        let back = chunking::verify(&id, content.len() as u32, &stored)
            .unwrap_or_else(|e| panic!("a chunk we stored does not verify: {e}"));
        assert_eq!(back.data(), &content[..]);
    }
}
