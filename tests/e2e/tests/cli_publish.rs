//! The `fleetcast` binary as CI runs it against the whole pipeline (the command's own checks,
//! with no pipeline, are in `services/cli/tests/cli.rs`).

use std::process::{Command, Output};

use fleetcast_e2e::binaries::binary;
use fleetcast_harness::fixtures::sample_package;

fn fleetcast(args: &[&str], nats_url: &str) -> Output {
    Command::new(binary("fleetcast"))
        .args(args)
        .env("FLEETCAST_NATS_URL", nats_url)
        // The test servers have no accounts or TLS.
        .env("FLEETCAST_NATS_INSECURE_DEV", "true")
        .output()
        .expect("run fleetcast")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_wait_exits_zero_when_stored_and_three_when_rejected() {
    let p = fleetcast_e2e::Pipeline::start().await.expect("pipeline");
    let url = p.nats.url();
    let zip = p.dir.path().join("collector-2.0.0.zip");
    sample_package("2.0.0").write_to(&zip).expect("zip");
    let zip_arg = zip.to_str().expect("utf8").to_string();
    let u = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        fleetcast(&["publish", &zip_arg, "--wait", "--timeout", "60s"], &u)
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("stored"));

    let old = p.dir.path().join("collector-1.0.0.zip");
    sample_package("1.0.0").write_to(&old).expect("zip");
    let old_arg = old.to_str().expect("utf8").to_string();
    let u = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        fleetcast(&["publish", &old_arg, "--wait", "--timeout", "60s"], &u)
    })
    .await
    .expect("join");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("version_not_newer"));

    let out = tokio::task::spawn_blocking(move || fleetcast(&["releases"], &url))
        .await
        .expect("join");
    let listing = text(&out.stdout);
    assert!(
        listing.contains("2.0.0") && listing.contains("stored") && listing.contains("rejected"),
        "{listing}"
    );
}
