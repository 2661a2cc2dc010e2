//! The agent's side of a release: assembling a verified version from the real chunk store,
//! reusing the chunks of the installed version, refusing tampered chunks, resuming.

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};

use fleetcast_agent::assemble::{
    AssembleError, ChunkSource, Fetched, LocalChunks, NatsChunks, assemble,
};
use fleetcast_agent::install::InstallRoot;
use fleetcast_e2e::Pipeline;
use fleetcast_events::names::{RELEASE_STORED, chunk_subject, release_key};
use fleetcast_events::v1::{ChunkIndex, ReleaseStored};
use fleetcast_events::{Encoding, VerifiedManifest};
use fleetcast_harness::fixtures::{PackageBuilder, pseudo_random};
use fleetcast_package::chunking::{ChunkError, ChunkId};
use fleetcast_runtime::Bus;
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

async fn release(
    p: &Pipeline,
    version: &str,
    pkg: &PackageBuilder,
) -> (VerifiedManifest, ChunkIndex) {
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

async fn load(bus: &Bus, p: &Pipeline, version: &str) -> (VerifiedManifest, ChunkIndex) {
    let record = bus
        .release_record("app", &v(version))
        .await
        .expect("record")
        .expect("some");
    let manifest = record
        .manifest
        .expect("manifest")
        .verify(&p.trusted(), time::OffsetDateTime::now_utc())
        .expect("verify");
    let bytes = bus
        .index
        .get(release_key("app", &v(version)))
        .await
        .expect("get")
        .expect("index");
    (manifest, Encoding::MsgPack.decode(&bytes).expect("decode"))
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
    let store = NatsChunks {
        chunks: fleetcast_runtime::AgentBus::from_bus(&bus)
            .await
            .expect("agent bus")
            .chunks,
        app: "app".into(),
    };

    let r1 = assemble(&root, &m1, &i1, &LocalChunks::default(), &store, 8)
        .await
        .expect("v1");
    // Each distinct chunk once.
    assert_eq!(
        r1.fetched_chunks as usize,
        i1.files
            .iter()
            .flat_map(|f| f.chunks.iter().map(|c| c.id.as_str()))
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
    let r2 = assemble(&root, &m2, &i2, &local, &store, 8)
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
        assemble(&root, &m2, &i2, &local, &store, 8)
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
    let store = NatsChunks {
        chunks: fleetcast_runtime::AgentBus::from_bus(&bus)
            .await
            .expect("agent bus")
            .chunks,
        app: "app".into(),
    };

    let flaky = Flaky {
        inner: &store,
        fail_after: AtomicUsize::new(10),
    };
    let err = assemble(&root, &m, &i, &LocalChunks::default(), &flaky, 1)
        .await
        .expect_err("interrupted");
    assert!(err.is_transient());
    let report = assemble(&root, &m, &i, &LocalChunks::default(), &store, 4)
        .await
        .expect("resumed");
    assert!(report.resumed_chunks >= 10, "{report:?}");
    let total: usize = i.files.iter().map(|f| f.chunks.len()).sum();
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
    let victim = &i.files[1].chunks[0];
    let forged = fleetcast_package::chunking::encode_stored(&vec![7u8; victim.len as usize])
        .expect("encode");
    bus.js
        .publish(chunk_subject("app", &victim.id), forged.into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let other = InstallRoot::new(host.path().join("other")).expect("root");
    let err = assemble(&other, &m, &i, &LocalChunks::default(), &store, 4)
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
    bus.js
        .publish(chunk_subject("app", &victim.id), bomb.into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let err = assemble(&other, &m, &i, &LocalChunks::default(), &store, 4)
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
