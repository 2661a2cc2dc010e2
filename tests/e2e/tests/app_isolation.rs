//! Apps isolated from the agent, with real processes: the agent (run by this test, as root)
//! starts its app, the app's hooks and its health command as `nobody`, and the app tries what
//! a compromised app would: read the agent's NATS credentials, write its trust state, journal,
//! installed files or `current` link. Each attempt is recorded by the app itself in its own
//! data folder, the one place it may write.
//!
//! Needs root (to start processes as another user); CI runs the tests as root. Run as anyone
//! else, the test fails and says so rather than passing without checking anything.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fleetcast_agent::journal::Journal;
use fleetcast_e2e::{Pipeline, eventually, journal_commits, journal_refuses};
use fleetcast_harness::accounts::AgentSpec;
use fleetcast_harness::fixtures::PackageBuilder;
use semver::Version;

const NOBODY: u32 = 65534;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "app_isolation needs root: it runs an app as the user nobody (uid {NOBODY}) to show what \
         that user cannot do to the agent; run the e2e tests as root (CI does)"
    );
}

/// The app: records who it runs as and which of the attempts the system allowed, then idles.
/// `$VAR` paths come from the agent's config for the app (env).
fn probe_app(version: &str, healthy: bool) -> PackageBuilder {
    let run = if healthy {
        format!(
            r#"#!/bin/sh
d="$FLEETCAST_DATA_DIR"
echo {version} >> "$d/starts"
try() {{
    name=$1; shift
    if "$@" >/dev/null 2>&1; then echo "$name allowed"; else echo "$name denied"; fi
}}
{{
    echo "uid $(id -u) gid $(id -g)"
    grep -E '^(Groups|CapEff|CapPrm|CapAmb):' /proc/self/status
    try read-credentials cat "$AGENT_CREDS"
    try write-credentials sh -c 'echo x >> "$AGENT_CREDS"'
    try write-journal sh -c 'echo x >> "$APP_ROOT/journal.a"'
    try add-to-journal-folder sh -c 'echo x > "$APP_ROOT/journal.json"'
    try write-trust-state sh -c 'echo x > "$AGENT_TRUST/root.json"'
    try write-installed-file sh -c 'echo x >> "$PWD/bin/run"'
    try chmod-installed-file chmod u+w "$PWD/bin/run"
    try add-installed-file sh -c 'echo x > "$PWD/planted"'
    try add-version sh -c 'mkdir "$APP_ROOT/versions/9.9.9"'
    try relink-current ln -sfn /tmp "$APP_ROOT/current"
    try write-own-data sh -c 'echo mine > "$FLEETCAST_DATA_DIR/mine"'
}} > "$d/probe.tmp"
mv "$d/probe.tmp" "$d/probe-{version}"
exec sleep 300
"#
        )
    } else {
        "#!/bin/sh\necho crashing >&2\nexit 3\n".to_string()
    };
    // The package's own config: a pre-switch hook and a health command, each recording the
    // user it ran as.
    let config = r#"
[health]
stay_up = "300ms"
command = ["sh", "-c", "id -u > \"$FLEETCAST_DATA_DIR/health-uid\""]
[hooks.pre_switch]
command = ["sh", "-c", "id -u > \"$FLEETCAST_DATA_DIR/hook-uid\""]
"#;
    PackageBuilder::new()
        // Packed world-writable: installed read-only all the same.
        .file("bin/run", run, 0o777)
        .file("VERSION", version.to_string(), 0o666)
        .file("fleetcast.toml", config, 0o644)
}

fn v(s: &str) -> Version {
    Version::parse(s).expect("version")
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).expect("stat").mode() & 0o7777
}

/// What the app recorded when `version` started, as lines.
async fn probe(data: &Path, version: &str) -> Vec<String> {
    let file = data.join(format!("probe-{version}"));
    eventually(&format!("the app {version} recorded its attempts"), || {
        file.exists()
    })
    .await;
    std::fs::read_to_string(&file)
        .expect("probe")
        .lines()
        .map(str::to_string)
        .collect()
}

fn starts(data: &Path) -> Vec<String> {
    std::fs::read_to_string(data.join("starts"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Every file and folder of an installed version: no write bit for anyone, no special bit,
/// readable (and folders searchable) by everyone.
fn assert_sealed(dir: &Path) {
    assert_eq!(mode(dir), 0o555, "{}", dir.display());
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let entry = entry.expect("entry");
        let kind = entry.file_type().expect("type");
        let path = entry.path();
        if kind.is_dir() {
            assert_sealed(&path);
        } else if kind.is_file() {
            assert!(
                [0o444, 0o555].contains(&mode(&path)),
                "{} has mode {:o}",
                path.display(),
                mode(&path)
            );
        }
    }
}

/// The app runs as nobody (no groups, no capabilities) and can touch nothing of the agent's:
/// not read its credentials, not write its journal, trust state, installed files or `current`
/// link; it writes only its own data folder. Its hook and health command run as nobody too.
/// Updates still install, switch and prune with read-only installs, and a failed health gate
/// still rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_running_as_its_own_user_cannot_touch_the_agent() {
    require_root();
    let mut p = Pipeline::new_closed(&[AgentSpec::new("iso-1", "default", &["shapp"])])
        .await
        .expect("pipeline");
    p.start_pipeline_as_roles();

    // The host: its folders must be passable for nobody, as /var/lib is (a test's temporary
    // folder is 0700).
    let host_guard = tempfile::tempdir().expect("tmp");
    let host = host_guard.path();
    std::fs::set_permissions(host, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // The agent's credentials where install-agent.sh puts them: 0600, the agent's own, in a
    // folder anyone may read.
    let etc = host.join("etc");
    std::fs::create_dir_all(&etc).expect("etc");
    let creds = etc.join("agent.creds");
    let accounts = p.accounts.as_ref().expect("accounts");
    std::fs::copy(accounts.agent_creds("iso-1"), &creds).expect("copy creds");
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let creds_before = std::fs::read(&creds).expect("creds");

    let data_dir = host.join("data");
    let app_root = data_dir.join("apps/shapp");
    let trust_dir = data_dir.join("trust");
    let mut settings = p.agent_settings("iso-1", "default", host);
    settings.nats = p.agent_nats_settings("iso-1");
    settings.nats.credentials = Some(creds.clone());
    settings.keep_versions = 2;
    let app = &mut settings.apps[0];
    app.user = Some("nobody".into());
    app.env = BTreeMap::from([
        ("AGENT_CREDS".to_string(), creds.display().to_string()),
        ("APP_ROOT".to_string(), app_root.display().to_string()),
        ("AGENT_TRUST".to_string(), trust_dir.display().to_string()),
    ]);
    p.start_agent(settings);

    let own = app_root.join("data");
    p.release("shapp", "1.0.0", &probe_app("1.0.0", true)).await;
    p.desire("shapp", "default", "1.0.0").await;
    let lines = probe(&own, "1.0.0").await;
    let has = |line: &str| lines.iter().any(|l| l == line);
    let field = |name: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in {lines:?}"))
            .to_string()
    };
    assert!(has(&format!("uid {NOBODY} gid {NOBODY}")), "{lines:?}");
    assert_eq!(field("Groups"), "", "supplementary groups kept: {lines:?}");
    for set in ["CapEff", "CapPrm", "CapAmb"] {
        assert_eq!(field(set), "0000000000000000", "{set}: {lines:?}");
    }
    for attempt in [
        "read-credentials",
        "write-credentials",
        "write-journal",
        "add-to-journal-folder",
        "write-trust-state",
        "write-installed-file",
        "chmod-installed-file",
        "add-installed-file",
        "add-version",
        "relink-current",
    ] {
        assert!(has(&format!("{attempt} denied")), "{attempt}: {lines:?}");
    }
    assert!(has("write-own-data allowed"), "{lines:?}");
    for what in ["hook-uid", "health-uid"] {
        // The health command runs once the app has been up for a while.
        // Written by a shell redirection: created first, filled a moment later.
        eventually(what, || {
            std::fs::read_to_string(own.join(what)).is_ok_and(|uid| uid.ends_with('\n'))
        })
        .await;
        let uid = std::fs::read_to_string(own.join(what)).expect(what);
        assert_eq!(uid.trim(), NOBODY.to_string(), "{what}");
    }

    // On disk: nothing of the agent's changed, the install is sealed, the data folder is the
    // app's.
    assert_eq!(std::fs::read(&creds).expect("creds"), creds_before);
    assert!(!trust_dir.join("root.json").exists());
    assert!(!app_root.join("journal.json").exists());
    assert!(!app_root.join("versions/9.9.9").exists());
    let installed = app_root.join("versions/1.0.0");
    assert_sealed(&installed);
    assert!(!installed.join("planted").exists());
    assert_eq!(mode(&installed.join("bin/run")), 0o555);
    assert_eq!(mode(&installed.join("VERSION")), 0o444);
    assert_eq!(
        std::fs::read_link(app_root.join("current")).expect("current"),
        PathBuf::from("versions/1.0.0")
    );
    let meta = std::fs::metadata(&own).expect("data folder");
    assert_eq!(
        (meta.uid(), meta.gid(), mode(&own)),
        (NOBODY, NOBODY, 0o700)
    );
    assert_eq!(mode(&data_dir), 0o711);
    assert_eq!(mode(&trust_dir), 0o700);
    assert_eq!(
        std::fs::read_to_string(own.join("mine")).expect("own file"),
        "mine\n"
    );

    // Updates through read-only installs: two more versions, the oldest pruned (keep 2).
    for version in ["2.0.0", "3.0.0"] {
        p.release("shapp", version, &probe_app(version, true)).await;
        p.desire("shapp", "default", version).await;
        let lines = probe(&own, version).await;
        assert!(lines.iter().any(|l| l == "write-installed-file denied"));
    }
    let journal = app_root.clone();
    journal_commits(&journal, "3.0.0").await;
    eventually("1.0.0 pruned", || !installed.exists()).await;
    for version in ["2.0.0", "3.0.0"] {
        assert_sealed(&app_root.join("versions").join(version));
    }

    // A version failing its gate rolls back to the sealed 3.0.0.
    p.release("shapp", "4.0.0", &probe_app("4.0.0", false))
        .await;
    p.desire("shapp", "default", "4.0.0").await;
    journal_refuses(&journal, "4.0.0").await;
    eventually("3.0.0 started again", || {
        starts(&own).iter().filter(|s| *s == "3.0.0").count() == 2
    })
    .await;
    assert_eq!(
        std::fs::read_link(app_root.join("current")).expect("current"),
        PathBuf::from("versions/3.0.0")
    );
    let running = Journal::load(&journal).expect("journal");
    assert_eq!(running.committed, Some(v("3.0.0")));
    // Nothing of the agent's changed through all of it.
    assert_eq!(std::fs::read(&creds).expect("creds"), creds_before);
}

/// An unknown user stops the agent at start with an error naming it, before it connects or
/// runs anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_app_user_is_an_error_at_start() {
    let p = Pipeline::new().await.expect("pipeline");
    let host = tempfile::tempdir().expect("tmp");
    let mut settings = p.agent_settings("iso-2", "default", host.path());
    // Nothing answers there: the agent must stop before it tries to connect.
    settings.nats.url = format!("nats://{}", fleetcast_e2e::free_addr());
    settings.apps[0].user = Some("no-such-user-fleetcast".into());
    let result = tokio::time::timeout(
        fleetcast_e2e::TIMEOUT,
        fleetcast_agent::run(settings, tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("the agent stops at once");
    let error = result.expect_err("an unknown user is refused").to_string();
    assert!(
        error.contains("no-such-user-fleetcast") && error.contains("does not exist"),
        "{error}"
    );
}
