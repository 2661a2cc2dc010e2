//! The demo app as the agent runs it: a real process, real HTTP, real signals.

use std::process::{Child, Command};
use std::time::Duration;

/// A free loopback port (see `fleetcast_harness::free_port`).
fn free_port() -> u16 {
    fleetcast_harness::free_port().expect("free port")
}

fn start(dir: &std::path::Path, port: u16, extra: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetcast-demo-app"));
    cmd.current_dir(dir)
        .env("FLEETCAST_DEMO_APP_PORT", port.to_string());
    for (k, v) in extra {
        cmd.env(format!("FLEETCAST_DEMO_APP_{k}"), v);
    }
    cmd.spawn().expect("spawn demo app")
}

/// `GET path` → (status, body); `None` while nothing listens yet.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    fleetcast_harness::http::get(port, path, None)
}

fn wait_get(port: u16, path: &str) -> (u16, String) {
    for _ in 0..400 {
        if let Some(r) = get(port, path) {
            return r;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("demo app never answered on port {port}");
}

#[test]
fn serves_version_from_its_folder_and_health() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("VERSION"), "2.1.0\n").expect("version");
    let port = free_port();
    let mut app = start(dir.path(), port, &[]);
    assert_eq!(wait_get(port, "/version"), (200, "2.1.0".into()));
    assert_eq!(wait_get(port, "/health"), (200, "ok".into()));
    app.kill().expect("kill");
    let _ = app.wait();
}

#[test]
fn can_be_told_to_fail_its_health_check_or_crash_at_start() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let mut app = start(dir.path(), port, &[("FAIL_HEALTH", "true")]);
    assert_eq!(wait_get(port, "/health").0, 503);
    app.kill().expect("kill");
    let _ = app.wait();

    let status = start(
        dir.path(),
        free_port(),
        &[("CRASH_AT_START", "true"), ("EXIT_CODE", "7")],
    )
    .wait()
    .expect("wait");
    assert_eq!(status.code(), Some(7));
}

#[test]
fn drains_for_its_configured_time_on_sigterm() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let marker = dir.path().join("drained");
    let mut app = start(
        dir.path(),
        port,
        &[
            ("DRAIN", "300ms"),
            ("DRAIN_MARKER", marker.to_str().expect("utf8")),
        ],
    );
    wait_get(port, "/health");
    let pid = nix::unistd::Pid::from_raw(app.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal");
    let status = app.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    assert!(marker.is_file(), "exited without draining");
}
