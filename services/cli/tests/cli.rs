//! The `fleetcast` binary as CI and operators run it.

use std::process::{Command, Output};

use fleetcast_harness::cli::{command, text};
use fleetcast_harness::fixtures::{hostile, sample_package};

fn fleetcast(args: &[&str], nats_url: &str) -> Output {
    command(env!("CARGO_BIN_EXE_fleetcast"), args, nats_url)
        .output()
        .expect("run fleetcast")
}

#[test]
fn keygen_writes_a_private_secret_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path().to_str().expect("utf8");
    let out = fleetcast(&["keygen", "--dir", d], "nats://127.0.0.1:1");
    assert!(out.status.success(), "{}", text(&out.stderr));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("signing.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let public = std::fs::read_to_string(dir.path().join("signing.pub")).expect("pub");
    assert!(fleetcast_events::PublicKey::from_text(&public).is_ok());
    let again = fleetcast(&["keygen", "--dir", d], "nats://127.0.0.1:1");
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("already exists"));
}

#[test]
fn publish_fails_clearly_on_a_bad_package_or_no_nats() {
    let dir = tempfile::tempdir().expect("tmp");
    let evil = dir.path().join("evil-1.0.0.zip");
    std::fs::write(&evil, hostile::path_traversal()).expect("zip");
    let out = fleetcast(
        &["publish", evil.to_str().expect("utf8")],
        "nats://127.0.0.1:1",
    );
    // Refused locally: exit 3 and the watcher's reason code, as when the pipeline refuses.
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert!(
        err.contains("path_traversal: ") && err.contains(".."),
        "{err}"
    );

    let unnamed = dir.path().join("release.zip");
    sample_package("1.0.0").write_to(&unnamed).expect("zip");
    let out = fleetcast(
        &["publish", unnamed.to_str().expect("utf8")],
        "nats://127.0.0.1:1",
    );
    assert!(
        text(&out.stderr).contains("--app and --version"),
        "{}",
        text(&out.stderr)
    );

    let good = dir.path().join("collector-1.0.0.zip");
    sample_package("1.0.0").write_to(&good).expect("zip");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let url = format!("nats://{}", listener.local_addr().expect("addr"));
    drop(listener); // nothing listens there now
    let out = fleetcast(
        &[
            "publish",
            good.to_str().expect("utf8"),
            "--connect-timeout",
            "1s",
        ],
        &url,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot reach NATS"),
        "{}",
        text(&out.stderr)
    );
}

/// Closed by default: without credentials and TLS, and without `--nats-insecure-dev`, the CLI
/// refuses to connect at all, and says which settings would let it.
#[test]
fn without_credentials_and_tls_the_cli_refuses_to_connect() {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .args(["status"])
        .env("FLEETCAST_NATS_URL", "nats://127.0.0.1:1")
        .env_remove("FLEETCAST_NATS_INSECURE_DEV")
        .env_remove("FLEETCAST_NATS_CREDENTIALS")
        .env_remove("FLEETCAST_NATS_TLS_CA")
        .output()
        .expect("run fleetcast");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("nats.credentials")
            && err.contains("nats.tls.ca_file")
            && err.contains("--nats-insecure-dev"),
        "{err}"
    );
}
