//! The supervisor with real child processes (small shell scripts).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use fleetcast_agent::crash_policy::CrashPolicy;
use fleetcast_agent::supervisor::{Event, ProcessSpec, StopOutcome, StopPolicy, Supervisor};
use tokio::sync::broadcast::Receiver;

mod common;

use common::{grace, shell};

/// `sh -c body` in `dir`, told where to leave its markers (`MARKER_DIR`: `dir`).
fn script(dir: &Path, body: &str) -> ProcessSpec {
    ProcessSpec {
        env: BTreeMap::from([("MARKER_DIR".to_string(), dir.display().to_string())]),
        ..shell(dir, body)
    }
}

fn quick_policy() -> CrashPolicy {
    CrashPolicy {
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        stable_after: Duration::from_secs(60),
        loop_crashes: 3,
        loop_window: Duration::from_secs(60),
        loop_pause: Duration::from_secs(3600),
    }
}

/// Next event, or a failure after a generous bound (never a timing assertion).
async fn next(events: &mut Receiver<Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(20), events.recv())
        .await
        .expect("an event")
        .expect("event channel open")
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

#[tokio::test]
async fn a_crashing_app_is_restarted_with_backoff_then_paused_as_a_crash_loop() {
    let dir = tempfile::tempdir().expect("tmp");
    let sup = Supervisor::new("crasher", quick_policy(), StopPolicy::default());
    let mut events = sup.subscribe();
    sup.start(script(dir.path(), "echo starting; exit 3")).await;
    for round in 0..3 {
        assert!(
            matches!(next(&mut events).await, Event::Started { .. }),
            "round {round}"
        );
        assert_eq!(
            next(&mut events).await,
            Event::Exited {
                code: Some(3),
                signal: None
            }
        );
        let decision = next(&mut events).await;
        if round < 2 {
            assert!(matches!(decision, Event::Restarting { .. }), "{decision:?}");
        } else {
            assert_eq!(
                decision,
                Event::CrashLoop {
                    pause: Duration::from_secs(3600)
                }
            );
        }
    }
    // Paused: stopping now finds nothing running.
    assert_eq!(sup.stop().await, StopOutcome::NotRunning);
}

#[tokio::test]
async fn stop_gives_the_app_its_grace_period_to_drain() {
    let dir = tempfile::tempdir().expect("tmp");
    let sup = Supervisor::new("drainer", quick_policy(), grace(Duration::from_secs(20)));
    let mut events = sup.subscribe();
    // On SIGTERM: finish the "job" (0.5 s), leave a marker, exit 0.
    let body = "trap 'sleep 0.5; echo drained > \"$MARKER_DIR/drained\"; exit 0' TERM; touch \"$MARKER_DIR/up\"; while :; do sleep 0.05; done";
    sup.start(script(dir.path(), body)).await;
    assert!(matches!(next(&mut events).await, Event::Started { .. }));
    while !dir.path().join("up").exists() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sup.stop().await, StopOutcome::Drained);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("drained"))
            .expect("marker")
            .trim(),
        "drained"
    );
    assert_eq!(next(&mut events).await, Event::Stopped { graceful: true });
}

#[tokio::test]
async fn an_app_ignoring_the_drain_signal_is_killed_with_its_children() {
    let dir = tempfile::tempdir().expect("tmp");
    let sup = Supervisor::new(
        "stubborn",
        quick_policy(),
        grace(Duration::from_millis(300)),
    );
    let mut events = sup.subscribe();
    // Ignores SIGTERM and starts a grandchild that would outlive a plain kill of the leader.
    let body = "trap '' TERM; sleep 300 & echo $! > \"$MARKER_DIR/child.pid\"; while :; do sleep 0.05; done";
    sup.start(script(dir.path(), body)).await;
    let Event::Started { pid } = next(&mut events).await else {
        panic!("not started")
    };
    let pid_file = dir.path().join("child.pid");
    while std::fs::read_to_string(&pid_file)
        .map(|s| s.trim().is_empty())
        .unwrap_or(true)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let grandchild: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid")
        .trim()
        .parse()
        .expect("number");
    assert!(alive(grandchild));
    assert_eq!(sup.stop().await, StopOutcome::Killed);
    assert!(!alive(pid as i32), "leader survived");
    // The grandchild is gone (a zombie reaped by init at the latest): poll briefly.
    for _ in 0..100 {
        if !alive(grandchild) || is_zombie(grandchild) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("grandchild {grandchild} survived the stop");
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

#[tokio::test]
async fn a_program_that_cannot_start_is_reported_and_retried() {
    let dir = tempfile::tempdir().expect("tmp");
    let sup = Supervisor::new("missing", quick_policy(), StopPolicy::default());
    let mut events = sup.subscribe();
    let spec = ProcessSpec {
        program: dir.path().join("no-such-binary"),
        args: vec![],
        ..shell(dir.path(), "")
    };
    sup.start(spec).await;
    assert!(matches!(next(&mut events).await, Event::SpawnFailed { .. }));
    assert!(matches!(next(&mut events).await, Event::Restarting { .. }));
    assert!(matches!(next(&mut events).await, Event::SpawnFailed { .. }));
}
