//! What a person trying fleetcast locally sees: files in the drop folder that are not packages
//! are refused where they can see why, the demo packages `ops/demo-release` makes run on an
//! agent set up as `ops/run-local` sets them up, and CI uploads whose event is refused do not
//! stay in the incoming store.

use fleetcast_e2e::Pipeline;
use fleetcast_events::names::PACKAGE_REJECTED;
use fleetcast_events::v1::RejectCode;

/// A wheel or a tarball dropped into the watched folder is refused like a bad zip (event,
/// note, moved aside); hidden and temporary files are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_zip_files_in_the_drop_folder_are_refused_visibly_and_temporary_ones_left_alone() {
    let mut p = Pipeline::new().await.expect("pipeline");
    p.start_watcher();
    let drop = p.drop_dir();
    std::fs::create_dir_all(&drop).expect("drop dir");
    // Written first, so they have settled by the time the refusals below are published.
    let left_alone = [
        ".collector-1.0.0.zip.swp",
        "collector-1.0.0.whl.part",
        "collector-1.0.0.zip.crdownload",
        "#notes.txt#",
        ".DS_Store",
    ];
    for name in left_alone {
        std::fs::write(drop.join(name), b"being written").expect("write");
    }
    let refused = ["collector-1.0.0-py3-none-any.whl", "collector-1.0.0.tar.gz"];
    for name in refused {
        let rejected = p.drop_rejected(name, b"not a zip at all").await;
        assert_eq!(rejected.reason.code, RejectCode::InvalidName, "{name}");
        assert!(
            rejected.reason.message.contains("not a zip"),
            "{name}: {}",
            rejected.reason.message
        );
        assert_eq!(rejected.app, None);
        let note =
            std::fs::read_to_string(drop.join("rejected").join(format!("{name}.reason.txt")))
                .expect("reason note");
        assert!(note.starts_with("invalid_name: "), "{note}");
        assert!(!drop.join(name).exists(), "{name} left in the drop folder");
    }
    for name in left_alone {
        assert!(drop.join(name).is_file(), "{name} was touched");
        assert!(
            !drop.join("rejected").join(name).exists(),
            "{name} was refused"
        );
    }
    assert_eq!(
        p.count_events(PACKAGE_REJECTED).await.expect("count"),
        refused.len() as u64,
        "only the non-zip files are refused"
    );
}
