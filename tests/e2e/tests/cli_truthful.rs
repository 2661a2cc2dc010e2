//! Truthful exit codes, through the `fleetcast` binary as CI runs it (issue 17): `publish
//! --wait` reports *its* archive's outcome (by its BLAKE3) with the reason code, `rollout watch
//! --version` ends at once for a version that is unknown or superseded, and its output off a
//! terminal is one plain line per change.

use fleetcast_events::AppName;
use std::process::{Output, Stdio};
use std::time::Duration;

use fleetcast_e2e::binaries::binary;
use fleetcast_e2e::checks::approve;
use fleetcast_e2e::{Pipeline, TIMEOUT, ring, rollout_of_in_phase, script_app};
use fleetcast_events::tracker::Command;
use fleetcast_events::tracker::Phase;
use fleetcast_harness::cli::text;
use fleetcast_harness::fixtures::{hostile, sample_package};
use fleetcast_tracker::policy::{AppPolicy, Approval};
use tokio::io::AsyncBufReadExt;

/// Only a guard against a hang (the point of these tests is that nothing waits for ever);
/// nothing is asserted on how long anything takes.
const HANG_GUARD: Duration = Duration::from_secs(180);

fn command(args: &[&str], nats_url: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::from(fleetcast_harness::cli::command(
        binary("fleetcast"),
        args,
        nats_url,
    ));
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

async fn fleetcast(args: &[&str], nats_url: &str) -> Output {
    tokio::time::timeout(HANG_GUARD, command(args, nats_url).output())
        .await
        .unwrap_or_else(|_| panic!("fleetcast {args:?} hung"))
        .expect("run fleetcast")
}

/// `fleetcast publish ARCHIVE --wait`, as CI runs it.
async fn publish_wait(archive: &std::path::Path, nats_url: &str) -> Output {
    let archive = archive.to_str().expect("utf8");
    fleetcast(
        &["publish", archive, "--wait", "--timeout", "60s"],
        nats_url,
    )
    .await
}

/// The CLI's error message: the stderr line starting `error: ` (other stderr lines are logs).
fn error_line(out: &Output) -> String {
    text(&out.stderr)
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error: line in {}", both(out)))
        .to_string()
}

fn both(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_wait_exits_with_its_own_archives_outcome_and_reason_code() {
    let p = Pipeline::start().await.expect("pipeline");
    let url = p.nats.url();
    let dir = p.dir.path();

    let good = dir.join("collector-2.0.0.zip");
    sample_package("2.0.0").write_to(&good).expect("zip");
    let out = publish_wait(&good, &url).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    assert!(
        text(&out.stdout).contains("stored collector 2.0.0"),
        "{}",
        both(&out)
    );

    // The same bytes again: that archive is stored, which is the truth for it.
    let out = publish_wait(&good, &url).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    assert!(text(&out.stdout).contains("already was"), "{}", both(&out));

    // Other content under the stored version: the signer refuses it. Before, this printed
    // the stored release's row and exited 0.
    let other = p.dir.path().join("other").join("collector-2.0.0.zip");
    std::fs::create_dir_all(other.parent().expect("parent")).expect("dir");
    script_app("2.0.0", true).write_to(&other).expect("zip");
    let out = publish_wait(&other, &url).await;
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    assert!(
        error_line(&out).contains("version_not_newer"),
        "{}",
        both(&out)
    );

    // An older version.
    let old = dir.join("collector-1.0.0.zip");
    sample_package("1.0.0").write_to(&old).expect("zip");
    let out = publish_wait(&old, &url).await;
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    assert!(
        error_line(&out).contains("version_not_newer"),
        "{}",
        both(&out)
    );

    // `releases` shows the stored release and both refusals, each by its archive's short
    // hash, in the schema's spelling.
    let out = fleetcast(&["releases", "--app", "collector"], &url).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    let listing = text(&out.stdout);
    let rows: Vec<&str> = listing
        .lines()
        .filter(|l| l.starts_with("collector"))
        .collect();
    let stored = rows.iter().filter(|r| r.contains(" stored ")).count();
    let rejected: Vec<&&str> = rows.iter().filter(|r| r.contains(" rejected ")).collect();
    assert_eq!(stored, 1, "{listing}");
    assert_eq!(rejected.len(), 2, "{listing}");
    assert!(
        rejected.iter().all(|r| r.contains("version_not_newer: ")),
        "{listing}"
    );
    assert!(!listing.contains("VersionNotNewer"), "{listing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_refused_locally_exits_three_with_the_watchers_code() {
    // Nothing listens here: a local refusal needs no NATS.
    let nowhere = format!("nats://{}", fleetcast_e2e::free_addr());
    let dir = tempfile::tempdir().expect("tmp");
    let evil = dir.path().join("evil-1.0.0.zip");
    std::fs::write(&evil, hostile::path_traversal()).expect("zip");
    let unnamed = dir.path().join("release.zip");
    sample_package("1.0.0").write_to(&unnamed).expect("zip");
    let good = dir.path().join("collector-1.0.0.zip");
    sample_package("1.0.0").write_to(&good).expect("zip");
    let [evil, unnamed, good] = [&evil, &unnamed, &good].map(|p| p.to_str().expect("utf8"));
    // A hostile archive, one not named `<app>-<version>.zip`, and one over the watcher's
    // limits, set the same way (`limits.*`): one entry allowed.
    for (args, code) in [
        (&["publish", evil, "--wait"][..], "path_traversal: "),
        (&["publish", unnamed], "invalid_name: "),
        (
            &["publish", good, "--limits-max-entries", "1"],
            "too_many_entries: ",
        ),
    ] {
        let out = fleetcast(args, &nowhere).await;
        assert_eq!(out.status.code(), Some(3), "{}", both(&out));
        assert!(error_line(&out).contains(code), "{}", both(&out));
    }

    // A good archive passes the local checks; then NATS is simply unreachable, and it says so.
    let out = fleetcast(&["publish", good, "--connect-timeout", "1s"], &nowhere).await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    let err = error_line(&out);
    assert!(
        err.starts_with(&format!(
            "error: cannot reach NATS at {nowhere}: unreachable"
        )),
        "{}",
        both(&out)
    );
    assert!(!err.contains("shut down"), "{err}");
}

/// A pipeline, a tracker with `approval` for `shapp` (rings canary and broad), and one agent
/// per ring, known to the tracker.
async fn fleet(approval: Approval) -> (Pipeline, tempfile::TempDir) {
    let mut p = Pipeline::start().await.expect("pipeline");
    let mut settings = p.tracker_settings();
    settings.apps.insert(
        AppName::from_static("shapp"),
        AppPolicy {
            approval,
            rings: vec![ring("canary", 1, 1), ring("broad", 1, 1)],
        },
    );
    p.start_tracker_with(settings);
    let hosts = tempfile::tempdir().expect("tmp");
    for (id, ring) in [("c1", "canary"), ("b1", "broad")] {
        let s = p.agent_settings(id, ring, &hosts.path().join(id));
        p.start_agent(s);
    }
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let reply = p.tracker_command(&Command::Status).await;
        if reply.is_ok_and(|r| r.agents.len() == 2) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "agents never known");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (p, hosts)
}

/// Releases the script app `shapp` `version` and waits until its rollout is in `phase`.
async fn release_until(p: &Pipeline, version: &str, phase: Phase) {
    p.release("shapp", version, &script_app(version, true))
        .await;
    let version = version.parse().expect("version");
    rollout_of_in_phase(p, "shapp", Some(&version), phase, String::new).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_watch_version_ends_at_once_for_an_unknown_or_superseded_version() {
    let (p, _hosts) = fleet(Approval::Auto).await;
    let url = p.nats.url();
    release_until(&p, "1.0.0", Phase::Completed).await;
    release_until(&p, "2.0.0", Phase::Completed).await;

    // Never published. Before, this waited for ever.
    let out = fleetcast(&["rollout", "watch", "shapp", "--version", "9.9.9"], &url).await;
    assert_eq!(out.status.code(), Some(6), "{}", both(&out));
    assert!(
        error_line(&out).contains("never published"),
        "{}",
        both(&out)
    );

    // Published, but rejected (not newer): not a stored release either.
    let old = p.dir.path().join("shapp-0.5.0.zip");
    script_app("0.5.0", true).write_to(&old).expect("zip");
    let out = publish_wait(&old, &url).await;
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    let out = fleetcast(&["rollout", "watch", "shapp", "--version", "0.5.0"], &url).await;
    assert_eq!(out.status.code(), Some(6), "{}", both(&out));
    assert!(
        error_line(&out).contains("version_not_newer"),
        "{}",
        both(&out)
    );

    // Stored, rolled out, and long replaced by 2.0.0. Before, this waited for ever.
    let out = fleetcast(&["rollout", "watch", "shapp", "--version", "1.0.0"], &url).await;
    assert_eq!(out.status.code(), Some(5), "{}", both(&out));
    assert!(
        text(&out.stdout).contains("shapp 1.0.0: superseded by the rollout of 2.0.0"),
        "{}",
        both(&out)
    );

    // The current one completed: 0.
    let out = fleetcast(&["rollout", "watch", "shapp", "--version", "2.0.0"], &url).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));

    // A command the tracker refuses: 1, and the message is an error.
    let out = fleetcast(&["approve", "nosuchapp"], &url).await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    assert!(error_line(&out).len() > "error: ".len(), "{}", both(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_watch_off_a_terminal_prints_one_line_per_change_as_it_happens() {
    let (p, _hosts) = fleet(Approval::Manual).await;
    let url = p.nats.url();
    release_until(&p, "1.0.0", Phase::AwaitingApproval).await;

    // stdout is a pipe here, as in a CI log.
    let mut child = command(&["rollout", "watch", "shapp", "--version", "1.0.0"], &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut lines = Vec::new();
    // A line while the rollout waits, before anything ends: progress is not held back.
    tokio::time::timeout(HANG_GUARD, async {
        while let Some(line) = stdout.next_line().await.expect("read") {
            let waiting = line.contains("awaiting approval");
            lines.push(line);
            if waiting {
                return;
            }
        }
        panic!("output ended without the waiting line: {lines:?}");
    })
    .await
    .expect("no line while the rollout waited for approval");

    let reply = approve(&p, None).await;
    assert!(reply.ok, "{}", reply.message);
    let status = tokio::time::timeout(HANG_GUARD, async {
        while let Some(line) = stdout.next_line().await.expect("read") {
            lines.push(line);
        }
        child.wait().await.expect("wait")
    })
    .await
    .expect("watch hung");
    assert_eq!(status.code(), Some(0), "{lines:#?}");

    // One line per change: no subject (the rollout, each ring) prints the same state twice,
    // and every state the rollout went through is there.
    let progress: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("shapp 1.0.0"))
        .collect();
    for (i, line) in progress.iter().enumerate() {
        assert!(
            !progress[..i].contains(line),
            "{line:?} printed twice: {lines:#?}"
        );
    }
    for want in [
        "shapp 1.0.0: awaiting approval",
        "shapp 1.0.0: completed",
        "shapp 1.0.0 ring canary: 0/1 done",
        "shapp 1.0.0 ring canary: 1/1 done",
        "shapp 1.0.0 ring broad: 1/1 done",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(want)),
            "no {want:?} in {lines:#?}"
        );
    }
    // No bars or terminal escapes in a log.
    assert!(lines.iter().all(|l| !l.contains('\u{1b}')), "{lines:#?}");
}

/// One table of exit codes: `fleetcast --help` prints it, and README.md has the same codes.
#[test]
fn help_and_readme_document_every_exit_code() {
    let out = std::process::Command::new(binary("fleetcast"))
        .arg("--help")
        .output()
        .expect("run fleetcast");
    assert!(out.status.success());
    let help = text(&out.stdout);
    let table = help
        .split_once("Exit codes:")
        .unwrap_or_else(|| panic!("no exit codes in {help}"))
        .1;
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"),
    )
    .expect("README.md");
    for code in 0..=6 {
        assert!(
            table
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{code} "))),
            "exit {code} missing from --help: {table}"
        );
        assert!(
            readme.contains(&format!("\n| {code} | ")),
            "exit {code} missing from README.md's table"
        );
    }
}
