//! The agent end to end: a real pipeline stores releases, the desired state is written to the
//! bucket the agent watches, and the agent supervises real processes through each update.

use fleetcast_events::{AppName, RingName};
use std::path::Path;
use std::time::Duration;

use fleetcast_agent::journal::Journal;
use fleetcast_e2e::checks::status_of;
use fleetcast_e2e::{
    Pipeline, TIMEOUT, eventually, journal_commits as committed, journal_refuses, running,
    script_app,
};
use semver::Version;
use tokio_util::sync::CancellationToken;

fn v(s: &str) -> Version {
    Version::parse(s).expect("version")
}

/// Releases `version` of the script app, desires it and waits until the host's journal (in
/// `journal`) commits it.
async fn update_to(p: &Pipeline, journal: &Path, version: &str) {
    p.release("shapp", version, &script_app(version, true))
        .await;
    p.desire("shapp", "default", version).await;
    committed(journal, version).await;
}

/// A host's folders: (guard, data dir, app state dir, the app's folder holding its journal).
fn host_dirs() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let host = tempfile::tempdir().expect("tmp");
    let (data, state) = (host.path().join("data"), host.path().join("state"));
    std::fs::create_dir_all(&state).expect("state");
    let journal = data.join("apps/shapp");
    (host, data, state, journal)
}

/// A host with its agent running: (guard, data dir, app state dir, journal folder, agent), as
/// [`host_dirs`] and [`start_agent_with`] give them.
type RunningHost = (
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    Agent,
);

/// A host whose agent runs v1 of `shapp`: where most tests start.
async fn host_on_v1(p: &Pipeline) -> RunningHost {
    host_running(p, &["1.0.0"], "1.0.0", |_| {}).await
}

/// A host whose agent (its settings changed by `tweak`, see [`start_agent_with`]) runs
/// `version` of `shapp`, once every one of `releases` is stored.
async fn host_running(
    p: &Pipeline,
    releases: &[&str],
    version: &str,
    tweak: impl FnOnce(&mut fleetcast_agent::Settings),
) -> RunningHost {
    let (host, data, state, journal) = host_dirs();
    for release in releases {
        p.release("shapp", release, &script_app(release, true))
            .await;
    }
    p.desire("shapp", "default", version).await;
    let agent = start_agent_with(p, &data, &state, tweak);
    eventually(&format!("{version} running"), || running(&state) == version).await;
    (host, data, state, journal, agent)
}

/// A running agent; `stop` waits until it has stopped its app (no stray processes).
struct Agent(CancellationToken, tokio::task::JoinHandle<()>);

impl Agent {
    async fn stop(self) {
        self.0.cancel();
        self.1.await.expect("agent task");
    }
}

fn start_agent(p: &Pipeline, data: &Path, state: &Path) -> Agent {
    start_agent_with(p, data, state, |_| {})
}

/// An agent for `shapp` with the tests' settings (the pipeline's, on the host that holds
/// `data` and `state`), changed by `tweak`.
fn start_agent_with(
    p: &Pipeline,
    data: &Path,
    state: &Path,
    tweak: impl FnOnce(&mut fleetcast_agent::Settings),
) -> Agent {
    let host = data.parent().expect("data is inside its host folder");
    let mut settings = p.agent_settings("host-1", "default", host);
    assert_eq!(
        settings.apps[0].env["STATE_DIR"],
        state.display().to_string()
    );
    settings.apps[0].health.stay_up = Duration::from_millis(500);
    tweak(&mut settings);
    let token = CancellationToken::new();
    let t = token.clone();
    Agent(
        token,
        tokio::spawn(async move { fleetcast_agent::run(settings, t).await.expect("agent") }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_updates_rolls_back_a_crashing_version_and_converges_after_being_offline() {
    let p = Pipeline::start().await.expect("pipeline");
    let (_host, data, state, journal, agent) = host_on_v1(&p).await;

    // Happy path: v2 replaces v1, v1 is kept as previous.
    update_to(&p, &journal, "2.0.0").await;
    assert_eq!(running(&state), "2.0.0");
    let j = Journal::load(&journal).expect("journal");
    assert_eq!(j.previous, Some(v("1.0.0")));
    assert!(data.join("apps/shapp/versions/1.0.0").is_dir());

    // A version that crashes at start is rolled back with its reason and never retried.
    p.release("shapp", "3.0.0", &script_app("3.0.0", false))
        .await;
    p.desire("shapp", "default", "3.0.0").await;
    journal_refuses(&journal, "3.0.0").await;
    let j = Journal::load(&journal).expect("journal");
    assert_eq!(j.committed, Some(v("2.0.0")));
    let reason = &j.refused.iter().next().expect("refused").1;
    assert!(reason.contains("code Some(3)"), "{reason}");
    eventually("v2 running again", || running(&state) == "2.0.0").await;

    // Offline while v4 is announced: converges when it comes back, without any resend.
    agent.stop().await;
    p.release("shapp", "4.0.0", &script_app("4.0.0", true))
        .await;
    p.desire("shapp", "default", "4.0.0").await;
    std::fs::remove_file(state.join("running")).expect("reset marker");
    let agent = start_agent(&p, &data, &state);
    eventually("v4 after restart", || running(&state) == "4.0.0").await;
    committed(&journal, "4.0.0").await;
    agent.stop().await;
}

/// Waits for the agent to report `state` for `version`; its reason.
async fn status_reason(
    p: &Pipeline,
    state: fleetcast_events::v1::AppState,
    version: &str,
) -> String {
    status_of(p, state, version)
        .await
        .reason
        .unwrap_or_default()
}

/// Writes a desired state for `shapp` carrying `manifest` as it is (however it was signed).
async fn desire_raw(p: &Pipeline, version: &str, manifest: fleetcast_events::SignedManifest) {
    desire_state(p, version, manifest, false).await;
}

/// Writes a desired state for `shapp` in ring `default`.
async fn desire_state(
    p: &Pipeline,
    version: &str,
    manifest: fleetcast_events::SignedManifest,
    slot: bool,
) {
    let bus = p.bus().await.expect("bus");
    let desired = fleetcast_events::v1::DesiredState {
        app: AppName::from_static("shapp"),
        ring: RingName::from_static("default"),
        version: v(version),
        manifest,
        slot,
    };
    let bytes = fleetcast_events::Encoding::Json
        .encode(&desired)
        .expect("encode");
    bus.desired
        .put(
            fleetcast_events::names::desired_key("shapp", "default"),
            bytes.into(),
        )
        .await
        .expect("put");
}

/// The stored, signed manifest of a release of `shapp`.
async fn stored_manifest(p: &Pipeline, version: &str) -> fleetcast_events::SignedManifest {
    let bus = p.bus().await.expect("bus");
    fleetcast_e2e::stored_manifest(&bus, "shapp", &v(version))
        .await
        .expect("manifest")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_announcements_are_refused_and_the_app_keeps_running() {
    use fleetcast_events::v1::AppState;
    use fleetcast_events::{Manifest, SecretKey, SignedManifest};

    let p = Pipeline::start().await.expect("pipeline");
    let (_host, _data, state, journal, agent) =
        host_running(&p, &["1.0.0", "2.0.0"], "2.0.0", |_| {}).await;

    let good = stored_manifest(&p, "2.0.0").await;
    let signed_as = |version: &str, key: &SecretKey, expires_in: time::Duration| {
        let mut m: Manifest = serde_json::from_str(&good.manifest).expect("manifest json");
        m.version = v(version);
        m.expires = time::OffsetDateTime::now_utc() + expires_in;
        SignedManifest::sign(&m, &[key]).expect("sign")
    };
    let mut tampered = good.clone();
    tampered.manifest = tampered.manifest.replace("\"2.0.0\"", "\"9.0.0\"");
    // Wrong software: a valid release of another app, announced under this app's key.
    let other_app = {
        let mut m: Manifest = serde_json::from_str(&good.manifest).expect("manifest json");
        m.app = AppName::from_static("otherapp");
        m.version = v("9.3.0");
        SignedManifest::sign(&m, &[&p.key]).expect("sign")
    };
    let cases = [
        ("9.0.0", tampered, "does not match"),
        (
            "9.1.0",
            signed_as(
                "9.1.0",
                &SecretKey::generate().expect("key"),
                time::Duration::days(1),
            ),
            "not trusted",
        ),
        (
            "9.2.0",
            signed_as("9.2.0", &p.key, -time::Duration::hours(1)),
            "expired",
        ),
        ("9.3.0", other_app, "otherapp"),
    ];
    for (version, manifest, why) in cases {
        desire_raw(&p, version, manifest).await;
        let reason = status_reason(&p, AppState::Refused, version).await;
        assert!(reason.contains(why), "{version}: {reason}");
    }
    // A replayed, validly signed, older announcement cannot downgrade.
    p.desire("shapp", "default", "1.0.0").await;
    let refused = status_of(&p, AppState::Refused, "1.0.0").await;
    assert!(refused.reason.unwrap_or_default().contains("older"));

    let j = Journal::load(&journal).expect("journal");
    assert_eq!(j.committed, Some(v("2.0.0")));
    assert_eq!(running(&state), "2.0.0");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_in_the_middle_of_a_download_still_converges() {
    let mut p = Pipeline::start().await.expect("pipeline");
    let (_host, data, state, journal, agent) = host_on_v1(&p).await;

    // v2 carries 32 MiB of unique data, so the download takes a while.
    let big = script_app("2.0.0", true).file(
        "data/blob",
        fleetcast_harness::fixtures::pseudo_random(64 << 20, 77),
        0o644,
    );
    p.release("shapp", "2.0.0", &big).await;
    p.desire("shapp", "default", "2.0.0").await;
    let partial = data.join("apps/shapp/versions/2.0.0.partial");
    for _ in 0..20_000 {
        if partial.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    p.nats.stop();
    let j = Journal::load(&journal).expect("journal");
    assert_ne!(
        j.committed,
        Some(v("2.0.0")),
        "the download finished before NATS stopped; make v2 bigger"
    );
    p.nats.restart().await.expect("restart nats");
    committed(&journal, "2.0.0").await;
    assert_eq!(running(&state), "2.0.0");
    assert!(!partial.exists());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_its_update_window_the_agent_downloads_but_does_not_switch() {
    use fleetcast_events::v1::AppState;
    let p = Pipeline::start().await.expect("pipeline");
    // Every switch waits for the window, the first install too: v1 is installed first by an
    // agent without windows.
    let (_host, data, state, journal, agent) =
        host_running(&p, &["1.0.0", "2.0.0"], "1.0.0", |_| {}).await;
    agent.stop().await;
    // A one-minute window twelve hours from now.
    let opens = time::OffsetDateTime::now_utc() + time::Duration::hours(12);
    let closes = opens + time::Duration::minutes(1);
    let window = format!(
        "{:02}:{:02}-{:02}:{:02}",
        opens.hour(),
        opens.minute(),
        closes.hour(),
        closes.minute()
    );
    let agent = start_agent_with(&p, &data, &state, |s| s.update_windows = vec![window]);
    eventually("v1 running again", || running(&state) == "1.0.0").await;
    p.desire("shapp", "default", "2.0.0").await;
    let waiting = status_of(&p, AppState::WaitingForWindow, "2.0.0").await;
    assert_eq!(waiting.app, "shapp");
    assert!(
        data.join("apps/shapp/versions/2.0.0").is_dir(),
        "v2 was not downloaded ahead of the window"
    );
    let j = Journal::load(&journal).expect("journal");
    assert_eq!(j.committed, Some(v("1.0.0")));
    assert_eq!(running(&state), "1.0.0");
    agent.stop().await;
}

/// A package of `shapp` that runs with its own `fleetcast.toml`: its command (`bin/own`,
/// writing `<version>-own` and its pid), and `hooks` appended to the file.
fn own_package(version: &str, hooks: &str) -> fleetcast_harness::fixtures::PackageBuilder {
    script_app(version, true)
        .file(
            "bin/own",
            "#!/bin/sh\necho \"$1\" > \"$STATE_DIR/running\"\necho $$ > \"$STATE_DIR/pid\"\nexec sleep 300\n",
            0o755,
        )
        .file(
            "fleetcast.toml",
            format!("command = [\"bin/own\", \"{version}-own\"]\n{hooks}"),
            0o644,
        )
}

/// Releases `shapp` `version` as [`own_package`] with `hooks`, and desires it.
async fn desire_own_package(p: &Pipeline, version: &str, hooks: &str) {
    p.release("shapp", version, &own_package(version, hooks))
        .await;
    p.desire("shapp", "default", version).await;
}

fn sh_hook(name: &str, script: &str, timeout: &str) -> String {
    format!(
        "[hooks.{name}]\ncommand = [\"/bin/sh\", \"-c\", {script:?}]\ntimeout = \"{timeout}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_brings_its_command_and_hooks_and_a_failing_hook_protects_the_running_app() {
    use fleetcast_events::v1::AppState;
    let p = Pipeline::start().await.expect("pipeline");
    let (_host, _data, state, journal, agent) = host_on_v1(&p).await;

    // v2: its own command; a pre-switch "migration" told where it comes from and goes to; a
    // post-switch hook that sees the new version already serving.
    let hooks = sh_hook(
        "pre_switch",
        "echo \"$FLEETCAST_FROM_VERSION->$FLEETCAST_VERSION\" >> \"$STATE_DIR/migrations\"",
        "10s",
    ) + &sh_hook(
        "post_switch",
        "cp \"$STATE_DIR/running\" \"$STATE_DIR/post\"",
        "10s",
    );
    desire_own_package(&p, "2.0.0", &hooks).await;
    committed(&journal, "2.0.0").await;
    assert_eq!(running(&state), "2.0.0-own", "the package's command runs");
    let read = |f: &str| std::fs::read_to_string(state.join(f)).unwrap_or_default();
    assert_eq!(read("migrations").trim(), "1.0.0->2.0.0");
    assert_eq!(read("post").trim(), "2.0.0-own");
    let pid = read("pid");

    // v3: the migration fails, v4: it hangs past its timeout. Both are refused before the
    // running app is touched (same process), the hung one is killed, neither is retried.
    let failing = sh_hook("pre_switch", "echo migration broke >&2; exit 4", "10s");
    let hanging = sh_hook(
        "pre_switch",
        "echo $$ > \"$STATE_DIR/hook.pid\"; exec sleep 600",
        "1s",
    );
    for (version, hooks, why) in [
        (
            "3.0.0",
            failing,
            "exited with exit status: 4: migration broke",
        ),
        ("4.0.0", hanging, "no exit within 1s, killed"),
    ] {
        desire_own_package(&p, version, &hooks).await;
        let reason = status_reason(&p, AppState::Refused, version).await;
        assert!(reason.contains("pre-switch hook failed"), "{reason}");
        assert!(reason.contains(why), "{version}: {reason}");
        let j = Journal::load(&journal).expect("journal");
        assert_eq!(j.committed, Some(v("2.0.0")));
        assert!(j.is_refused(&v(version)));
        assert_eq!(read("pid"), pid, "{version}: the running app was restarted");
        assert_eq!(running(&state), "2.0.0-own");
    }
    let hook_pid: i32 = read("hook.pid").trim().parse().expect("hook pid");
    eventually("hung hook killed", || {
        std::fs::read_to_string(format!("/proc/{hook_pid}/stat")).map_or(true, |s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
    })
    .await;

    // v5: the post-switch hook fails after the switch → rolled back, v2 serves again.
    let post_fails = sh_hook(
        "post_switch",
        "echo cache warm-up failed >&2; exit 1",
        "10s",
    );
    desire_own_package(&p, "5.0.0", &post_fails).await;
    let reason = status_reason(&p, AppState::RolledBack, "5.0.0").await;
    assert!(
        reason.contains("post-switch hook failed") && reason.contains("cache warm-up failed"),
        "{reason}"
    );
    eventually("v2 serving again", || running(&state) == "2.0.0-own").await;
    assert_eq!(
        Journal::load(&journal).expect("journal").committed,
        Some(v("2.0.0"))
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_with_slots_switches_only_once_granted_and_waits_while_nobody_answers() {
    use fleetcast_events::v1::{AppState, SlotReply, SlotRequest};
    use futures::StreamExt;
    let p = Pipeline::start().await.expect("pipeline");
    let (_host, data, state, journal, agent) =
        host_running(&p, &["1.0.0", "2.0.0"], "1.0.0", |s| {
            s.slot_retry = Duration::from_millis(300)
        })
        .await;

    // The rollout asks for slots; no slot service runs: staged, waiting, still on v1.
    desire_state(&p, "2.0.0", stored_manifest(&p, "2.0.0").await, true).await;
    let reason = status_reason(&p, AppState::WaitingForSlot, "2.0.0").await;
    assert!(
        reason.contains("fleetcast.v1.slot.shapp.host-1"),
        "{reason}"
    );
    assert!(
        data.join("apps/shapp/versions/2.0.0").is_dir(),
        "not staged"
    );
    let bus = p.bus().await.expect("bus");
    let mut requests = bus
        .client
        .subscribe(fleetcast_events::names::slot_subject("shapp", "host-1"))
        .await
        .expect("subscribe");
    // Still waiting after several retries with nobody answering... then a slot service: it
    // refuses the first request (all slots taken) and grants the next.
    assert_eq!(running(&state), "1.0.0");
    assert_eq!(
        Journal::load(&journal).expect("journal").committed,
        Some(v("1.0.0"))
    );
    for grant in [false, true] {
        let msg = tokio::time::timeout(TIMEOUT, requests.next())
            .await
            .expect("a slot request")
            .expect("subscription");
        let request: SlotRequest = serde_json::from_slice(&msg.payload).expect("request");
        assert_eq!(
            (
                request.agent_id.as_str(),
                request.ring.as_str(),
                request.version.clone()
            ),
            ("host-1", "default", v("2.0.0"))
        );
        assert_eq!(
            running(&state),
            "1.0.0",
            "switched before a slot was granted"
        );
        let reply = SlotReply {
            granted: grant,
            retry_after_ms: 200,
            reason: (!grant).then(|| "ring default: 1 of 1 slots taken".to_string()),
        };
        bus.client
            .publish(
                msg.reply.expect("reply subject"),
                serde_json::to_vec(&reply).expect("encode").into(),
            )
            .await
            .expect("reply");
        if !grant {
            // The refusal's reason is what the agent reports while it waits.
            p.wait_status(|s: &fleetcast_events::v1::AgentStatus| {
                s.state == AppState::WaitingForSlot
                    && s.reason.as_deref() == Some("ring default: 1 of 1 slots taken")
            })
            .await
            .expect("waiting with the service's reason");
        }
    }
    committed(&journal, "2.0.0").await;
    assert_eq!(running(&state), "2.0.0");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_rollback_directive_moves_back_once_and_cannot_be_replayed() {
    use fleetcast_events::v1::AppState;
    use fleetcast_events::{Manifest, SignedManifest};
    let p = Pipeline::start().await.expect("pipeline");
    let (_host, _data, state, journal, agent) = host_on_v1(&p).await;
    update_to(&p, &journal, "2.0.0").await;

    // The directive: v1's manifest re-signed as replacing everything up to v2 (what the signer
    // issues when an operator rolls back).
    let stored = stored_manifest(&p, "1.0.0").await;
    let mut m: Manifest = serde_json::from_str(&stored.manifest).expect("manifest json");
    m.rollback_from = Some(v("2.0.0"));
    m.expires = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    let directive = SignedManifest::sign(&m, &[&p.key]).expect("sign");
    desire_state(&p, "1.0.0", directive.clone(), false).await;
    committed(&journal, "1.0.0").await;
    assert_eq!(running(&state), "1.0.0");
    let j = Journal::load(&journal).expect("journal");
    let withdrawn = j.refused.iter().find(|(ver, _)| *ver == v("2.0.0"));
    assert!(
        withdrawn.is_some_and(|(_, why)| why.contains("withdrawn by a signed rollback")),
        "{:?}",
        j.refused
    );

    // The withdrawn v2 announced again is ignored; a fixed v3 goes through (straight from v1:
    // v2 never ran in between).
    p.desire("shapp", "default", "2.0.0").await;
    update_to(&p, &journal, "3.0.0").await;
    assert_eq!(
        Journal::load(&journal).expect("journal").previous,
        Some(v("1.0.0"))
    );

    // The directive replayed after v3 cannot take the host back.
    desire_state(&p, "1.0.0", directive, false).await;
    let reason = status_reason(&p, AppState::Refused, "1.0.0").await;
    assert!(reason.contains("replayed directive"), "{reason}");
    assert_eq!(running(&state), "3.0.0");
    agent.stop().await;
}

/// A remote site's agent behind a leaf node (`ops/nats/leaf-site.conf`, no JetStream of its
/// own) learns of a new desired state as it is written: its slow re-check is an hour here, so
/// only the announcement can bring it. A leaf node does not pass the bucket's own `$KV.…`
/// subjects on; the server republishes each write on a plain subject, which it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_behind_a_leaf_node_gets_each_announcement_as_it_is_written() {
    let (mut p, leaf) = Pipeline::new_with_leaf().await.expect("hub and leaf");
    p.start_watcher();
    p.start_signer();
    p.start_distributor("distributor");
    p.release("shapp", "1.0.0", &script_app("1.0.0", true))
        .await;
    p.release("shapp", "2.0.0", &script_app("2.0.0", true))
        .await;
    let host = tempfile::tempdir().expect("tmp");
    let mut settings = p.agent_settings("site-1", "canary", host.path());
    settings.nats.url = leaf.url();
    settings.recheck = Duration::from_secs(3600);
    p.start_agent(settings);
    let state = host.path().join("state");

    p.desire("shapp", "canary", "1.0.0").await;
    eventually("site-1 runs 1.0.0", || running(&state) == "1.0.0").await;
    // Past the agent's reads made on connecting (at start and 3 s later): from here on only
    // an announcement can tell it of 2.0.0.
    tokio::time::sleep(Duration::from_secs(4)).await;
    p.desire("shapp", "canary", "2.0.0").await;
    eventually("site-1 runs 2.0.0", || running(&state) == "2.0.0").await;
}

/// `verify_on_start`: a file of the running version changed on disk after install. When the app
/// next starts (here after a crash) the agent hashes the folder against the signed tree, does
/// not start it, and reports `failed` with the changed path; the last update's outcome stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_changed_on_disk_is_not_started_with_verify_on_start() {
    use std::os::unix::fs::PermissionsExt;
    let p = Pipeline::start().await.expect("pipeline");
    let (_host, data, state, journal, agent) = host_running(&p, &["1.0.0"], "1.0.0", |s| {
        s.apps[0].verify_on_start = true;
    })
    .await;
    committed(&journal, "1.0.0").await;

    // Someone edits the installed program (made writable first: installs are read-only).
    let dir = data.join("apps/shapp/versions/1.0.0");
    let program = dir.join("bin/run");
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut text = std::fs::read_to_string(&program).expect("read");
    text = text.replace("exec sleep 300", "echo changed; exec sleep 300");
    std::fs::write(&program, text).expect("tamper");
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    std::fs::remove_file(state.join("running")).expect("reset marker");

    // The app crashes; its restart is refused.
    // "<pid> <start time>"
    let pid: i32 = std::fs::read_to_string(data.join("apps/shapp/app.pid"))
        .expect("pid file")
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let reason = status_reason(&p, fleetcast_events::v1::AppState::Failed, "1.0.0").await;
    assert!(
        reason.contains("verify_on_start") && reason.contains("bin/run"),
        "{reason}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(running(&state), "", "the changed version was started");
    agent.stop().await;
}
