//! The `fleetcast` binary as CI runs it against the whole pipeline (the command's own checks,
//! with no pipeline, are in `services/cli/tests/cli.rs`).

use std::process::Output;

use fleetcast_e2e::binaries::binary;
use fleetcast_harness::cli::{command, text};
use fleetcast_harness::fixtures::sample_package;

/// `fleetcast ARGS`, run off the test's runtime (the command waits on the pipeline the
/// runtime drives).
async fn fleetcast(args: &[&str], nats_url: &str) -> Output {
    let mut cmd = command(binary("fleetcast"), args, nats_url);
    tokio::task::spawn_blocking(move || cmd.output().expect("run fleetcast"))
        .await
        .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_wait_exits_zero_when_stored_and_three_when_rejected() {
    let p = fleetcast_e2e::Pipeline::start().await.expect("pipeline");
    let url = p.nats.url();
    let zip = p.dir.path().join("collector-2.0.0.zip");
    sample_package("2.0.0").write_to(&zip).expect("zip");
    let zip_arg = zip.to_str().expect("utf8");
    let out = fleetcast(&["publish", zip_arg, "--wait", "--timeout", "60s"], &url).await;
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("stored"));

    let old = p.dir.path().join("collector-1.0.0.zip");
    sample_package("1.0.0").write_to(&old).expect("zip");
    let old_arg = old.to_str().expect("utf8");
    let out = fleetcast(&["publish", old_arg, "--wait", "--timeout", "60s"], &url).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("version_not_newer"));

    let out = fleetcast(&["releases"], &url).await;
    let listing = text(&out.stdout);
    assert!(
        listing.contains("2.0.0") && listing.contains("stored") && listing.contains("rejected"),
        "{listing}"
    );
}
