//! The agent's side of a release: reading its signed tree and assembling a verified version from
//! the real chunk store, fetching only the tree nodes and chunks the installed version lacks,
//! refusing tampered chunks and nodes, resuming.

use fleetcast_events::AppName;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};

use fleetcast_agent::assemble::{
    AssembleError, AssembleReport, ChunkSource, Fetched, LocalChunks, NatsChunks, assemble,
};
use fleetcast_agent::install::InstallRoot;
use fleetcast_e2e::Pipeline;
use fleetcast_e2e::TestBus;
use fleetcast_events::names::{RELEASE_STORED, chunk_subject};
use fleetcast_events::patches::PatchList;
use fleetcast_events::tree::{ChunkList, TreeFile};
use fleetcast_events::v1::{ChunkRef, ReleaseStored};
use fleetcast_harness::fixtures::{PackageBuilder, pseudo_random, rebuilt};
use fleetcast_package::chunking::{ChunkError, ChunkId};
use semver::Version;

fn v(s: &str) -> Version {
    Version::parse(s).expect("version")
}

fn package(version: &str, big: Vec<u8>) -> PackageBuilder {
    PackageBuilder::new()
        .file("bin/app", format!("#!/bin/sh\necho {version}\n"), 0o755)
        .file("data/big.bin", big, 0o644)
        .symlink("bin/app-current", "app")
}

async fn release(p: &Pipeline, version: &str, pkg: &PackageBuilder) -> (Version, Vec<TreeFile>) {
    std::fs::create_dir_all(p.drop_dir()).expect("dir");
    pkg.write_to(&p.drop_dir().join(format!("app-{version}.zip")))
        .expect("drop");
    let want = v(version);
    p.wait_event(RELEASE_STORED, move |e: &ReleaseStored| e.version == want)
        .await
        .expect("stored");
    let bus = p.bus().await.expect("bus");
    load(&bus, p, version).await
}

async fn load(bus: &TestBus, p: &Pipeline, version: &str) -> (Version, Vec<TreeFile>) {
    let files = fleetcast_e2e::release_files(bus, &p.trusted(), "app", &v(version))
        .await
        .expect("tree");
    (v(version), files)
}

/// Assembles `version` on a host with nothing installed (no local chunks, no patches).
async fn from_nothing(
    root: &InstallRoot,
    version: &Version,
    files: &[TreeFile],
    source: &impl ChunkSource,
    concurrency: usize,
) -> Result<AssembleReport, AssembleError> {
    let (local, patches) = (LocalChunks::default(), PatchList::default());
    assemble(root, version, files, &local, &patches, source, concurrency).await
}

/// The store as the agent reads it, for app `app`.
async fn store(bus: &TestBus) -> NatsChunks {
    NatsChunks {
        chunks: fleetcast_runtime::AgentBus::from_bus(bus)
            .await
            .expect("agent bus")
            .chunks,
        app: AppName::from_static("app"),
    }
}

/// Every chunk of `files`, in order.
fn chunks(files: &[TreeFile]) -> Vec<&ChunkRef> {
    files
        .iter()
        .flat_map(|f| match &f.chunks {
            ChunkList::Listed(list) => list.iter().collect(),
            ChunkList::Tree { .. } => Vec::new(),
        })
        .collect()
}

/// Serves chunks from the real store, but the connection "drops" after `fail_after` fetches.
struct Flaky<'a> {
    inner: &'a NatsChunks,
    fail_after: AtomicUsize,
}

impl ChunkSource for Flaky<'_> {
    async fn fetch(&self, id: &ChunkId, len: u32) -> Result<Fetched, AssembleError> {
        let left = self
            .fail_after
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if left.is_err() {
            return Err(AssembleError::Fetch {
                id: id.to_hex(),
                reason: "connection lost (test)".into(),
            });
        }
        self.inner.fetch(id, len).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_assemble_from_the_store_reusing_installed_chunks() {
    let p = Pipeline::start().await.expect("pipeline");
    let bus = p.bus().await.expect("bus");
    let big = pseudo_random(3 << 20, 11);
    let v1 = package("1.0.0", big.clone());
    let (m1, i1) = release(&p, "1.0.0", &v1).await;
    let mut big2 = big.clone();
    big2[2_000_000..2_004_096].copy_from_slice(&pseudo_random(4096, 12));
    let v2 = package("2.0.0", big2.clone());
    let (m2, i2) = release(&p, "2.0.0", &v2).await;

    let host = tempfile::tempdir().expect("tmp");
    let root = InstallRoot::new(host.path().join("app")).expect("root");
    let store = store(&bus).await;

    let r1 = from_nothing(&root, &m1, &i1, &store, 8).await.expect("v1");
    // Each distinct chunk once.
    assert_eq!(
        r1.fetched_chunks as usize,
        chunks(&i1)
            .iter()
            .map(|c| c.id.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len()
    );
    let dir1 = root.version_dir(&v("1.0.0"));
    assert_eq!(std::fs::read(dir1.join("data/big.bin")).expect("read"), big);
    assert_eq!(
        std::fs::metadata(dir1.join("bin/app"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o7777,
        0o555,
        "packed 0755, installed read-only"
    );
    assert_eq!(
        std::fs::read_link(dir1.join("bin/app-current"))
            .expect("link")
            .to_str(),
        Some("app")
    );
    assert!(!root.partial_dir(&v("1.0.0")).exists());
    root.switch_to(&v("1.0.0")).expect("switch");

    let mut local = LocalChunks::default();
    local.add_version(&dir1, &i1);
    let r2 = assemble(&root, &m2, &i2, &local, &PatchList::default(), &store, 8)
        .await
        .expect("v2");
    assert!(
        r2.fetched_chunks <= 3,
        "fetched {} chunks for a 4 KiB change",
        r2.fetched_chunks
    );
    assert!(r2.reused_chunks > 20);
    assert!(r2.fetched_bytes < 3 * 256 * 1024);
    assert_eq!(
        std::fs::read(root.version_dir(&v("2.0.0")).join("data/big.bin")).expect("read"),
        big2
    );
    // Assembling an installed version again is a no-op.
    assert_eq!(
        assemble(&root, &m2, &i2, &local, &PatchList::default(), &store, 8)
            .await
            .expect("again")
            .fetched_chunks,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_download_resumes_and_a_tampered_chunk_is_refused() {
    let p = Pipeline::start().await.expect("pipeline");
    let bus = p.bus().await.expect("bus");
    let pkg = package("1.0.0", pseudo_random(2 << 20, 21));
    let (m, i) = release(&p, "1.0.0", &pkg).await;
    let host = tempfile::tempdir().expect("tmp");
    let root = InstallRoot::new(host.path().join("app")).expect("root");
    let store = store(&bus).await;

    let flaky = Flaky {
        inner: &store,
        fail_after: AtomicUsize::new(10),
    };
    let err = from_nothing(&root, &m, &i, &flaky, 1)
        .await
        .expect_err("interrupted");
    assert!(err.is_transient());
    let report = from_nothing(&root, &m, &i, &store, 4)
        .await
        .expect("resumed");
    assert!(report.resumed_chunks >= 10, "{report:?}");
    let total = chunks(&i).len();
    assert_eq!(report.resumed_chunks + report.fetched_chunks, total as u64);
    let files = fleetcast_e2e::reassemble(&bus, &p.trusted(), "app", &v("1.0.0"))
        .await
        .expect("reference");
    for (path, content) in files {
        assert_eq!(
            std::fs::read(root.version_dir(&v("1.0.0")).join(&path)).expect("read"),
            content,
            "{path}"
        );
    }

    // The store now serves other bytes under one chunk's name: nothing gets installed.
    let victim = chunks(&i)[1];
    let forged = fleetcast_package::chunking::encode_stored(&vec![7u8; victim.len as usize])
        .expect("encode");
    overwrite_chunk(&bus, &victim.id, forged).await;
    let other = InstallRoot::new(host.path().join("other")).expect("root");
    let err = from_nothing(&other, &m, &i, &store, 4)
        .await
        .expect_err("tampered");
    assert!(
        matches!(err, AssembleError::Chunk(ChunkError::Hash { .. })),
        "{err}"
    );
    assert!(
        !other.version_dir(&v("1.0.0")).exists(),
        "a tampered version was installed"
    );

    // Endless data: a chunk that decompresses to 64 MiB (a few KiB stored) is cut off at the
    // largest chunk size and refused; one stored larger than that is refused by the store.
    let mut bomb = vec![1u8]; // the zstd encoding
    bomb.extend(zstd::bulk::compress(&vec![0u8; 64 << 20], 19).expect("compress"));
    assert!(bomb.len() < 64 << 10, "{} bytes", bomb.len());
    overwrite_chunk(&bus, &victim.id, bomb).await;
    let err = from_nothing(&other, &m, &i, &store, 4)
        .await
        .expect_err("endless chunk");
    assert!(
        matches!(err, AssembleError::Chunk(ChunkError::Decompress { .. })),
        "{err}"
    );
    assert!(!other.version_dir(&v("1.0.0")).exists());
    let oversized = bus
        .js
        .publish(
            chunk_subject("app", &victim.id),
            vec![0u8; 512 << 10].into(),
        )
        .await
        .expect("publish");
    assert!(oversized.await.is_err(), "the store took a 512 KiB chunk");
}

/// Serves from the real store and records every object fetched.
struct Counting<'a> {
    inner: &'a NatsChunks,
    fetched: std::sync::Mutex<Vec<ChunkId>>,
}

impl ChunkSource for Counting<'_> {
    async fn fetch(&self, id: &ChunkId, len: u32) -> Result<Fetched, AssembleError> {
        if let Ok(mut f) = self.fetched.lock() {
            f.push(*id);
        }
        self.inner.fetch(id, len).await
    }

    async fn patch_list(&self, root: &str) -> Option<(PatchList, u64)> {
        self.inner.patch_list(root).await
    }
}

/// Stages `m` into `root` from `store`, counting: what was staged and every object fetched,
/// in order (an object fetched twice is there twice).
async fn stage_counting(
    root: &InstallRoot,
    m: &fleetcast_events::VerifiedManifest,
    store: &NatsChunks,
    what: &str,
) -> (fleetcast_agent::release_tree::Staged, Vec<ChunkId>) {
    let counting = Counting {
        inner: store,
        fetched: Default::default(),
    };
    let staged =
        fleetcast_agent::release_tree::stage(root, m, &counting, 8, tokio::time::Instant::now())
            .await
            .expect(what);
    let fetched = counting.fetched.lock().expect("lock").clone();
    (staged, fetched)
}

/// Installs `base` in `root`, then stages `m` over it from `store`, counting: what was staged
/// and the objects fetched for `m`.
async fn stage_over(
    root: &InstallRoot,
    base: &fleetcast_events::VerifiedManifest,
    m: &fleetcast_events::VerifiedManifest,
    store: &NatsChunks,
) -> (
    fleetcast_agent::release_tree::Staged,
    std::collections::HashSet<ChunkId>,
) {
    fleetcast_agent::release_tree::stage(root, base, store, 8, tokio::time::Instant::now())
        .await
        .expect("the base installed");
    let (staged, fetched) = stage_counting(root, m, store, "staged over the base").await;
    (staged, fetched.into_iter().collect())
}

/// Stores `bytes` under the name of the chunk (or tree node) `id` of the app, as a forger with
/// write access to the store would: the store itself checks nothing but the size.
async fn overwrite_chunk(bus: &TestBus, id: &str, bytes: Vec<u8>) {
    bus.js
        .publish(chunk_subject("app", id), bytes.into())
        .await
        .expect("publish")
        .await
        .expect("ack");
}

async fn verified(
    bus: &TestBus,
    p: &Pipeline,
    version: &str,
) -> fleetcast_events::VerifiedManifest {
    bus.records
        .release_record("app", &v(version))
        .await
        .expect("record")
        .expect("some")
        .manifest
        .expect("manifest")
        .verify(&p.trusted(), time::OffsetDateTime::now_utc())
        .expect("verify")
}

/// A source-code-like package: `n` small text files in 30 folders, `edited` of them changed.
fn sources(version: &str, n: usize, edited: &[usize]) -> PackageBuilder {
    let mut pkg =
        PackageBuilder::new().file("bin/app", format!("#!/bin/sh\necho {version}\n"), 0o755);
    for i in 0..n {
        let mut text = format!("// file {i}\n").repeat(40 + i % 50);
        if edited.contains(&i) {
            text.push_str(&format!("// edited in {version}\n"));
        }
        pkg = pkg.file(&format!("src/m{:02}/f{i:04}.rs", i % 30), text, 0o644);
    }
    pkg
}

/// Ten edited files out of 3,000: the agent fetches exactly the new tree nodes and the edited
/// files' chunks, each once; every other file is a hard link to the installed version; the
/// result is the package. A forged tree node in the store is refused and nothing installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_edited_files_of_three_thousand_fetch_only_their_nodes_and_chunks() {
    use fleetcast_agent::release_tree::stage;
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt;
    let p = Pipeline::start().await.expect("pipeline");
    let bus = p.bus().await.expect("bus");
    let edited = [7, 300, 301, 999, 1200, 1500, 2001, 2500, 2750, 2999];
    let (_, f1) = release(&p, "1.0.0", &sources("1.0.0", 3000, &[])).await;
    let (_, f2) = release(&p, "2.0.0", &sources("2.0.0", 3000, &edited)).await;
    let (m1, m2) = (
        verified(&bus, &p, "1.0.0").await,
        verified(&bus, &p, "2.0.0").await,
    );
    let store = store(&bus).await;
    let host = tempfile::tempdir().expect("tmp");
    let root = InstallRoot::new(host.path().join("app")).expect("root");
    stage(&root, &m1, &store, 8, tokio::time::Instant::now())
        .await
        .expect("v1");

    // What v2 has that v1 has not: tree nodes (the tree is deterministic, so building it
    // here gives the stored nodes) and the chunks of the edited files.
    let nodes = |files: &[TreeFile]| -> HashSet<ChunkId> {
        fleetcast_events::tree::build(files)
            .expect("tree")
            .nodes
            .iter()
            .map(|(r, _)| ChunkId(r.hash.0))
            .collect()
    };
    let old_files: HashSet<&str> = f1.iter().map(|f| f.entry.blake3.as_str()).collect();
    let changed: Vec<TreeFile> = f2
        .iter()
        .filter(|f| !old_files.contains(f.entry.blake3.as_str()))
        .cloned()
        .collect();
    assert_eq!(changed.len(), edited.len() + 1, "the edits and bin/app");
    let new_nodes: HashSet<ChunkId> = nodes(&f2).difference(&nodes(&f1)).copied().collect();
    let new_chunks: HashSet<ChunkId> = chunks(&changed)
        .iter()
        .map(|c| ChunkId::from_hex(&c.id).expect("id"))
        .collect();

    let (staged, fetched) = stage_counting(&root, &m2, &store, "v2").await;
    let distinct: HashSet<ChunkId> = fetched.iter().copied().collect();
    assert_eq!(fetched.len(), distinct.len(), "an object fetched twice");
    let expected: HashSet<ChunkId> = new_nodes.union(&new_chunks).copied().collect();
    assert_eq!(
        distinct, expected,
        "fetched exactly the new nodes and chunks"
    );
    assert!(
        new_nodes.len() <= 4 * changed.len(),
        "{} new tree nodes for {} changed files",
        new_nodes.len(),
        changed.len()
    );
    assert_eq!(staged.fetched_nodes as usize, new_nodes.len());
    assert_eq!(staged.files.linked_files as usize, f2.len() - changed.len());

    let (d1, d2) = (root.version_dir(&v("1.0.0")), root.version_dir(&v("2.0.0")));
    let linked = f2
        .iter()
        .filter(|f| {
            let ino = |d: &std::path::Path| {
                std::fs::metadata(d.join(&f.entry.path))
                    .map(|m| m.ino())
                    .ok()
            };
            ino(&d1).is_some() && ino(&d1) == ino(&d2)
        })
        .count();
    assert_eq!(
        linked,
        f2.len() - changed.len(),
        "unchanged files share v1's inodes"
    );
    let package = fleetcast_e2e::reassemble(&bus, &p.trusted(), "app", &v("2.0.0"))
        .await
        .expect("reference");
    assert_eq!(package.len(), f2.len());
    for (path, content) in &package {
        assert_eq!(
            &std::fs::read(d2.join(path)).expect("read"),
            content,
            "{path}"
        );
    }

    // A forged tree node: another node's bytes under one of v2's new nodes' name.
    let victim = new_nodes.iter().next().expect("a new node");
    let forged = fleetcast_package::chunking::encode_stored(b"not the node").expect("encode");
    overwrite_chunk(&bus, &victim.to_hex(), forged).await;
    let other = InstallRoot::new(host.path().join("other")).expect("root");
    let err = stage(&other, &m2, &store, 8, tokio::time::Instant::now())
        .await
        .expect_err("forged node");
    assert!(matches!(err, AssembleError::Chunk(_)), "{err}");
    assert!(
        !other.version_dir(&v("2.0.0")).exists(),
        "installed from a forged tree"
    );
}

fn server(version: &str, binary: Vec<u8>) -> PackageBuilder {
    PackageBuilder::new()
        .file("bin/server", binary, 0o755)
        .file("README", format!("server {version}\n"), 0o644)
}

/// Waits for the distributor's patch list of `m` (made after the tracker's `patches_wanted`).
async fn patch_list(store: &NatsChunks, m: &fleetcast_events::VerifiedManifest) -> PatchList {
    for _ in 0..600 {
        if let Some((list, _)) = store.patch_list(&m.tree.root).await
            && !list.patches.is_empty()
        {
            return list;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no patch list for {}", m.version);
}

/// v1 installed, v2 a rebuilt binary: the patch from v1's file is fetched and applied, and none
/// of the binary's chunks; the result is the signed file. A host holding another version reads
/// the list but never fetches a patch it has no base for; a host with nothing installed does
/// not even read the list. A tampered piece is refused and the file comes from its chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_binary_comes_as_a_patch_from_the_installed_build() {
    use fleetcast_agent::release_tree::stage;
    use fleetcast_events::names::PATCHES_WANTED;
    use fleetcast_events::v1::PatchesWanted;
    use std::collections::HashSet;
    let p = Pipeline::start().await.expect("pipeline");
    let bus = p.bus().await.expect("bus");
    let build1 = pseudo_random(3 << 20, 11);
    let build2 = rebuilt(&build1, 2);
    release(&p, "0.9.0", &server("0.9.0", pseudo_random(3 << 20, 99))).await;
    release(&p, "1.0.0", &server("1.0.0", build1.clone())).await;
    let (_, f2) = release(&p, "2.0.0", &server("2.0.0", build2.clone())).await;
    let (m0, m1, m2) = (
        verified(&bus, &p, "0.9.0").await,
        verified(&bus, &p, "1.0.0").await,
        verified(&bus, &p, "2.0.0").await,
    );
    // What the tracker asks once v2 is stored and its fleet runs v1.
    let wanted = PatchesWanted {
        app: AppName::from_static("app"),
        version: v("2.0.0"),
        bases: vec![v("1.0.0")],
    };
    bus.publish_event(
        PATCHES_WANTED,
        &wanted,
        fleetcast_events::Encoding::Json,
        None,
    )
    .await
    .expect("ask for patches");
    let store = store(&bus).await;
    let list = patch_list(&store, &m2).await;
    assert_eq!(list.patches.len(), 1, "one rebuilt file, one base");
    let patch = list.patches[0].clone();
    assert_eq!(patch.file.to_hex(), blake3::hash(&build2).to_hex().as_str());
    assert_eq!(patch.base.to_hex(), blake3::hash(&build1).to_hex().as_str());
    assert!(
        patch.len * 10 < patch.delta,
        "patch {} bytes against {} of chunks",
        patch.len,
        patch.delta
    );
    let pieces: HashSet<ChunkId> = patch.pieces.iter().map(|p| ChunkId(p.id.0)).collect();
    let binary = f2
        .iter()
        .find(|f| f.entry.path == "bin/server")
        .expect("binary");
    let binary_chunks: HashSet<ChunkId> = chunks(std::slice::from_ref(binary))
        .iter()
        .map(|c| ChunkId::from_hex(&c.id).expect("id"))
        .collect();

    // v1 installed: the patch, none of the binary's chunks.
    let host = tempfile::tempdir().expect("tmp");
    let root = InstallRoot::new(host.path().join("app")).expect("root");
    let (staged, fetched) = stage_over(&root, &m1, &m2, &store).await;
    assert_eq!(staged.files.patched_files, 1);
    assert_eq!(staged.files.refused_patches, 0);
    assert!(fetched.is_superset(&pieces), "the patch was fetched");
    assert!(
        fetched.is_disjoint(&binary_chunks),
        "a chunk of the patched binary was fetched"
    );
    assert!(staged.patch_list_bytes > 0);
    // The pieces as stored: the patch, plus a byte of framing per piece.
    assert!(staged.files.patch_bytes > 0 && staged.files.patch_bytes <= patch.len + 64);
    let installed = root.version_dir(&v("2.0.0")).join("bin/server");
    assert_eq!(std::fs::read(&installed).expect("read"), build2);
    let mode = std::fs::metadata(&installed)
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o222, 0, "installed writable");

    // Another version installed (no base for the patch): the list is read, no piece fetched.
    let other = InstallRoot::new(host.path().join("other")).expect("root");
    let (staged, fetched) = stage_over(&other, &m0, &m2, &store).await;
    assert_eq!(staged.files.patched_files, 0);
    assert!(
        fetched.is_disjoint(&pieces),
        "a patch without its base was fetched"
    );
    assert!(fetched.is_superset(&binary_chunks));
    assert!(staged.patch_list_bytes > 0);
    assert_eq!(
        std::fs::read(other.version_dir(&v("2.0.0")).join("bin/server")).expect("read"),
        build2
    );

    // Nothing installed: not even the list.
    let fresh = InstallRoot::new(host.path().join("fresh")).expect("root");
    let staged = stage(&fresh, &m2, &store, 8, tokio::time::Instant::now())
        .await
        .expect("v2 fresh");
    assert_eq!(staged.patch_list_bytes, 0);
    assert_eq!(staged.files.patched_files, 0);

    // A tampered piece: refused, the file assembled from its chunks, and still the signed one.
    let victim = patch.pieces[0];
    let forged = fleetcast_package::chunking::encode_stored(&vec![7u8; victim.len as usize])
        .expect("encode");
    overwrite_chunk(&bus, &victim.id.to_hex(), forged).await;
    let third = InstallRoot::new(host.path().join("third")).expect("root");
    stage(&third, &m1, &store, 8, tokio::time::Instant::now())
        .await
        .expect("v1");
    let staged = stage(&third, &m2, &store, 8, tokio::time::Instant::now())
        .await
        .expect("v2 despite the forged patch");
    assert_eq!(staged.files.refused_patches, 1);
    assert_eq!(staged.files.patched_files, 0);
    assert_eq!(
        std::fs::read(third.version_dir(&v("2.0.0")).join("bin/server")).expect("read"),
        build2
    );
}
