//! The release pipeline end to end, on a real nats-server with real files:
//! drop folder or CI → watcher → signer → distributor → chunks + index + `release.stored`.

use std::time::Duration;

use fleetcast_e2e::checks::{publish, signer_refuses};
use fleetcast_e2e::{Pipeline, TestBus, chunk_ids, reassemble};
use fleetcast_events::names::*;
use fleetcast_events::v1::*;
use fleetcast_harness::fixtures::{PackageBuilder, hostile, pseudo_random, sample_package};
use semver::Version;

fn v(s: &str) -> Version {
    Version::parse(s).expect("version")
}

/// Every file reassembled from stored chunks equals what went into the zip.
async fn assert_reassembles(p: &Pipeline, app: &str, version: &str, package: &PackageBuilder) {
    let bus = p.bus().await.expect("bus");
    let files = reassemble(&bus, &p.trusted(), app, &v(version))
        .await
        .expect("reassemble");
    for (path, content) in package.files() {
        assert_eq!(
            files.get(&path),
            Some(&content),
            "{path} differs after reassembly"
        );
    }
}

/// The `release.stored` event of `version`, once published.
async fn stored_event(p: &Pipeline, version: &str) -> ReleaseStored {
    let want = v(version);
    p.wait_event(RELEASE_STORED, move |e: &ReleaseStored| e.version == want)
        .await
        .expect("stored")
}

/// `collector`'s release record of `version`, which says stored.
async fn assert_stored(bus: &TestBus, version: &str) -> ReleaseRecord {
    let record = bus
        .records
        .release_record("collector", &v(version))
        .await
        .expect("record")
        .expect("some");
    assert_eq!(record.state, ReleaseState::Stored);
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_zip_is_signed_chunked_and_stored() {
    let p = Pipeline::start().await.expect("pipeline");
    let package = sample_package("1.0.0");
    let bytes = package.build();
    let target = p.drop_dir().join("collector-1.0.0.zip");
    std::fs::create_dir_all(p.drop_dir()).expect("drop dir");
    // A temporary name is ignored; a file written in two halves is not read half-written.
    std::fs::write(p.drop_dir().join("collector-1.0.0.zip.part"), b"partial").expect("write");
    let half = bytes.len() / 2;
    std::fs::write(&target, &bytes[..half]).expect("first half");
    tokio::time::sleep(Duration::from_millis(150)).await;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&target)
            .expect("open");
        f.write_all(&bytes[half..]).expect("second half");
    }

    let stored: ReleaseStored = p
        .wait_event(RELEASE_STORED, |e: &ReleaseStored| e.app == "collector")
        .await
        .expect("stored");
    assert_eq!(stored.version, v("1.0.0"));
    assert_eq!(stored.files, 5);
    assert_eq!(stored.new_chunks, stored.chunks);
    assert_reassembles(&p, "collector", "1.0.0", &package).await;
    assert_eq!(
        p.count_events(PACKAGE_REJECTED).await.expect("count"),
        0,
        "the half-written file was rejected"
    );
    assert!(p.drop_dir().join("processed/collector-1.0.0.zip").is_file());
    assert!(
        p.drop_dir().join("collector-1.0.0.zip.part").is_file(),
        "temporary file touched"
    );
    assert_stored(&p.bus().await.expect("bus"), "1.0.0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ci_publish_gives_the_same_result_and_v2_stores_only_new_chunks() {
    let p = Pipeline::start().await.expect("pipeline");
    let bus = p.bus().await.expect("bus");
    let v1 = PackageBuilder::new()
        .file("bin/agent", pseudo_random(2 << 20, 1), 0o755)
        .file("share/big.dat", pseudo_random(3 << 20, 2), 0o644)
        .file("README", "hello\n".repeat(1000), 0o644);
    let zip = p.dir.path().join("collector-1.0.0.zip");
    v1.write_to(&zip).expect("zip");
    publish(&p.cli().await.expect("cli"), &zip, Some("ci-test"))
        .await
        .expect("publish");
    let record = fleetcast_cli::wait_for_release(
        &p.cli().await.expect("cli"),
        "collector",
        &v("1.0.0"),
        fleetcast_e2e::TIMEOUT,
    )
    .await
    .expect("wait");
    assert_eq!(record.state, ReleaseState::Stored, "{:?}", record.reason);
    assert_reassembles(&p, "collector", "1.0.0", &v1).await;

    // v2: 4 KiB patched in place in the middle of one file, everything else the same.
    let mut big = pseudo_random(3 << 20, 2);
    big[1_500_000..1_504_096].copy_from_slice(&pseudo_random(4096, 99));
    let v2 = PackageBuilder::new()
        .file("bin/agent", pseudo_random(2 << 20, 1), 0o755)
        .file("share/big.dat", big, 0o644)
        .file("README", "hello\n".repeat(1000), 0o644);
    let zip2 = p.dir.path().join("collector-1.1.0.zip");
    v2.write_to(&zip2).expect("zip");
    let chunks_before = p.stored_chunks().await.expect("chunks");
    publish(&p.cli().await.expect("cli"), &zip2, None)
        .await
        .expect("publish v2");
    let stored = stored_event(&p, "1.1.0").await;
    assert_reassembles(&p, "collector", "1.1.0", &v2).await;
    let old = chunk_ids(&bus, &p.trusted(), "collector", &v("1.0.0"))
        .await
        .expect("ids");
    let new = chunk_ids(&bus, &p.trusted(), "collector", &v("1.1.0"))
        .await
        .expect("ids");
    let fresh = new.difference(&old).count() as u64;
    assert_eq!(stored.new_chunks, fresh);
    assert!(
        (1..=3).contains(&fresh),
        "a 4 KiB patch stored {fresh} new chunks"
    );
    assert!(stored.new_stored_bytes <= 3 * 256 * 1024);
    // The store holds the new chunks and the new nodes of v2's tree.
    assert_eq!(
        p.stored_chunks().await.expect("chunks"),
        chunks_before + fresh + stored.new_tree_nodes
    );
    // v1's content again as 1.2.0 (CI re-releasing unchanged files): the same tree, stored
    // already, so the archive is not read, nothing is stored, and the release is complete.
    let request = fleetcast_cli::PublishRequest {
        archive: &zip,
        app: None,
        version: Some(v("1.2.0")),
        published_by: None,
        progress: None,
    };
    fleetcast_cli::publish(&p.cli().await.expect("cli"), request)
        .await
        .expect("publish again");
    let again = stored_event(&p, "1.2.0").await;
    assert_eq!(
        (again.new_chunks, again.chunks, again.new_tree_nodes),
        (0, 0, 0)
    );
    assert_reassembles(&p, "collector", "1.2.0", &v1).await;
    // Archives are dropped from the incoming store once stored.
    let mut listing = bus.incoming.store().list().await.expect("list");
    use futures::StreamExt;
    assert!(listing.next().await.is_none(), "incoming store not emptied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_packages_are_rejected_with_their_reason_and_nothing_is_stored() {
    let mut p = Pipeline::new().await.expect("pipeline");
    let mut settings = p.watcher_settings();
    settings.limits.max_entries = 100;
    p.start_watcher_with(settings);
    p.start_signer();
    p.start_distributor("distributor");

    let cases: Vec<(&str, Vec<u8>, RejectCode)> = vec![
        (
            "traversal-1.0.0.zip",
            hostile::path_traversal(),
            RejectCode::PathTraversal,
        ),
        (
            "absolute-1.0.0.zip",
            hostile::absolute_path(),
            RejectCode::AbsolutePath,
        ),
        (
            "symlink-1.0.0.zip",
            hostile::symlink_outside(),
            RejectCode::LinkOutsidePackage,
        ),
        (
            "duplicate-1.0.0.zip",
            hostile::duplicate_entries(),
            RejectCode::DuplicateEntry,
        ),
        (
            "bomb-1.0.0.zip",
            hostile::zip_bomb(),
            RejectCode::CompressionRatio,
        ),
        (
            "many-1.0.0.zip",
            hostile::too_many_entries(101),
            RejectCode::TooManyEntries,
        ),
        (
            "truncated-1.0.0.zip",
            hostile::truncated(),
            RejectCode::CorruptArchive,
        ),
        (
            "config-1.0.0.zip",
            hostile::bad_package_config(),
            RejectCode::InvalidPackageConfig,
        ),
        (
            "collector-latest.zip",
            sample_package("1.0.0").build(),
            RejectCode::InvalidName,
        ),
        // What no host could install: refused here, not retried by every agent of a ring.
        (
            "longname-1.0.0.zip",
            hostile::name_too_long(),
            RejectCode::NameTooLong,
        ),
        (
            "clash-1.0.0.zip",
            hostile::file_and_folder(),
            RejectCode::PathConflict,
        ),
        (
            "empty-1.0.0.zip",
            hostile::no_file(),
            RejectCode::EmptyPackage,
        ),
    ];
    for (name, bytes, code) in &cases {
        let rejected = p.drop_rejected(name, bytes).await;
        assert_eq!(
            rejected.reason.code, *code,
            "{name}: {}",
            rejected.reason.message
        );
        assert!(!rejected.reason.message.is_empty());
        let note = std::fs::read_to_string(
            p.drop_dir()
                .join("rejected")
                .join(format!("{name}.reason.txt")),
        )
        .expect("note");
        assert!(note.contains(&rejected.reason.message));
        // The schema's spelling of the code (`path_traversal`), as everywhere.
        assert!(note.starts_with(&format!("{code}: ")), "{note}");
    }

    // Content damaged inside a valid directory: the signer finds it when it hashes.
    std::fs::write(
        p.drop_dir().join("corrupt-1.0.0.zip"),
        hostile::corrupt_content(),
    )
    .expect("drop");
    let rejected: ReleaseRejected = p
        .wait_event(RELEASE_REJECTED, |e: &ReleaseRejected| e.app == "corrupt")
        .await
        .expect("rejected");
    assert_eq!(
        rejected.reason.code,
        RejectCode::CorruptArchive,
        "{}",
        rejected.reason.message
    );
    assert_eq!(rejected.stage, "signer");

    // An event that does not decode.
    let bus = p.bus().await.expect("bus");
    let subject = fleetcast_events::names::release_published_subject("ci");
    bus.js
        .publish(subject.clone(), "{\"app\": 42".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let bad: EventRejected = p
        .wait_event(EVENT_REJECTED, move |e: &EventRejected| {
            e.subject == subject
        })
        .await
        .expect("event rejected");
    assert_eq!(bad.reason.code, RejectCode::InvalidEvent);
    assert_eq!(bad.stage, "watcher");

    // A version not newer than the last signed one.
    let good = sample_package("2.0.0");
    std::fs::write(p.drop_dir().join("collector-2.0.0.zip"), good.build()).expect("drop");
    p.wait_event(RELEASE_STORED, |e: &ReleaseStored| e.app == "collector")
        .await
        .expect("stored");
    let old = signer_refuses(&p, "collector", "1.9.0", &sample_package("1.9.0")).await;
    assert_eq!(
        old.reason.code,
        RejectCode::VersionNotNewer,
        "{}",
        old.reason.message
    );
    // The same version again with other content is refused too, and the good one stays stored.
    let again = signer_refuses(&p, "collector", "2.0.0", &sample_package("2.0.0-other")).await;
    assert_eq!(again.reason.code, RejectCode::VersionNotNewer);
    let record = assert_stored(&bus, "2.0.0").await;

    // Nothing was kept for any refused package: only the good release's chunks and tree nodes,
    // no archives.
    let good_chunks = chunk_ids(&bus, &p.trusted(), "collector", &v("2.0.0"))
        .await
        .expect("ids")
        .len() as u64;
    let nodes = record.stored.as_ref().map_or(0, |s| s.tree_nodes);
    assert!(nodes >= 1);
    assert_eq!(
        p.stored_chunks().await.expect("chunks"),
        good_chunks + nodes
    );
    assert_eq!(p.count_events(RELEASE_STORED).await.expect("count"), 1);
    let mut listing = bus.incoming.store().list().await.expect("list");
    use futures::StreamExt;
    assert!(
        listing.next().await.is_none(),
        "a rejected archive was kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_distributor_and_restarted_nats_still_store_the_release_exactly_once() {
    let mut p = Pipeline::new().await.expect("pipeline");
    p.start_watcher();
    p.start_signer();
    // Compressible (so storing takes a while) and unique, so a kill lands mid-job.
    let text: Vec<u8> = (0..1_200_000u32)
        .flat_map(|i| format!("line {i} of the log {}\n", i % 977).into_bytes())
        .collect();
    let package = PackageBuilder::new().file("big.log", text, 0o644);
    std::fs::create_dir_all(p.drop_dir()).expect("dir");
    package
        .write_to(&p.drop_dir().join("collector-1.0.0.zip"))
        .expect("drop");
    p.wait_event(RELEASE_SIGNED, |_: &ReleaseSigned| true)
        .await
        .expect("signed");

    // Distributor killed mid-job: once some chunks are stored, before it finishes.
    let mut chunks = p.bus().await.expect("bus").chunks;
    p.start_distributor("distributor");
    for _ in 0..2000 {
        if chunks.info().await.expect("info").state.messages > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    p.kill("distributor");
    assert_eq!(
        p.count_events(RELEASE_STORED).await.expect("count"),
        0,
        "finished before the kill; make the package bigger"
    );
    p.start_distributor("distributor");
    p.wait_event(RELEASE_STORED, |_: &ReleaseStored| true)
        .await
        .expect("stored after restart");
    assert_reassembles(&p, "collector", "1.0.0", &package).await;

    // nats-server killed and restarted while v2 is in the pipeline.
    let v2 = PackageBuilder::new().file("big.bin", pseudo_random(24 << 20, 6), 0o644);
    v2.write_to(&p.drop_dir().join("collector-2.0.0.zip"))
        .expect("drop");
    p.wait_event(PACKAGE_DETECTED, |e: &PackageDetected| {
        e.version == v("2.0.0")
    })
    .await
    .expect("detected");
    p.nats.restart().await.expect("restart nats");
    p.wait_event(RELEASE_STORED, |e: &ReleaseStored| e.version == v("2.0.0"))
        .await
        .expect("stored after nats restart");
    assert_reassembles(&p, "collector", "2.0.0", &v2).await;
    tokio::time::sleep(Duration::from_secs(3)).await; // past the ack wait: any redelivery has happened
    assert_eq!(
        p.count_events(RELEASE_STORED).await.expect("count"),
        2,
        "a release was stored twice"
    );
    assert_eq!(
        p.count_events(RELEASE_SIGNED).await.expect("count"),
        2,
        "a release was signed twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_distributors_store_each_chunk_once_and_announce_once() {
    let mut p = Pipeline::new().await.expect("pipeline");
    p.start_watcher();
    p.start_signer();
    p.start_distributor("distributor-a");
    p.start_distributor("distributor-b");
    let package = PackageBuilder::new()
        .file("a.bin", pseudo_random(4 << 20, 8), 0o644)
        .file("b.bin", pseudo_random(4 << 20, 8), 0o644); // same content: dedup inside a release
    std::fs::create_dir_all(p.drop_dir()).expect("dir");
    package
        .write_to(&p.drop_dir().join("collector-1.0.0.zip"))
        .expect("drop");
    let stored: ReleaseStored = p
        .wait_event(RELEASE_STORED, |_: &ReleaseStored| true)
        .await
        .expect("stored");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(p.count_events(RELEASE_STORED).await.expect("count"), 1);
    let bus = p.bus().await.expect("bus");
    let unique = chunk_ids(&bus, &p.trusted(), "collector", &v("1.0.0"))
        .await
        .expect("ids")
        .len() as u64;
    assert_eq!(stored.chunks, 2 * unique);
    assert_eq!(stored.new_chunks, unique);
    assert_eq!(
        p.stored_chunks().await.expect("chunks"),
        unique + stored.tree_nodes
    );
    assert_reassembles(&p, "collector", "1.0.0", &package).await;
}

/// A desired-state bucket made before fleetcast set its republish setting (an upgrade) gets it
/// when a service starts: every write then also goes out on a plain subject, which leaf nodes
/// pass on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_made_before_the_republish_setting_gets_it() {
    use async_nats::jetstream::kv;
    use futures::StreamExt;
    let p = Pipeline::new().await.expect("pipeline");
    let client = p
        .nats
        .client_options()
        .connect(p.nats.url())
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client.clone());
    js.create_key_value(kv::Config {
        bucket: DESIRED_BUCKET.into(),
        history: 10,
        ..Default::default()
    })
    .await
    .expect("old bucket");

    let bus = p.bus().await.expect("bus");
    let mut stream = bus.desired.stream.clone();
    let republish = stream.info().await.expect("info").config.republish.clone();
    assert_eq!(
        republish.map(|r| (r.source, r.destination)),
        Some((
            format!("$KV.{DESIRED_BUCKET}.>"),
            format!("{DESIRED_SUBJECT_PREFIX}>")
        ))
    );
    let mut announcements = client
        .subscribe(format!("{DESIRED_SUBJECT_PREFIX}shapp.canary"))
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    // The server may start republishing a moment after it answered the update (seen on a
    // loaded machine: the first write after it was not republished): writes are made, each
    // with its own value, until one goes out; it carries its own revision.
    let deadline = tokio::time::Instant::now() + fleetcast_e2e::TIMEOUT;
    let mut written = std::collections::BTreeMap::new();
    let message = loop {
        let value = format!("v{}", written.len());
        let revision = bus
            .desired
            .put("shapp.canary", value.clone().into())
            .await
            .expect("put");
        written.insert(value, revision);
        match tokio::time::timeout(Duration::from_secs(2), announcements.next()).await {
            Ok(message) => break message.expect("subscription open"),
            Err(_) => assert!(
                tokio::time::Instant::now() < deadline,
                "none of {} writes republished",
                written.len()
            ),
        }
    };
    let value = String::from_utf8(message.payload.to_vec()).expect("utf-8");
    let revision = written.get(&value).expect("one of the writes");
    let sequence = message
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_SEQUENCE))
        .map(|v| v.as_str().to_string());
    assert_eq!(sequence, Some(revision.to_string()), "with its revision");
}
