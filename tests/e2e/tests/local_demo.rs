//! What a person trying fleetcast locally sees: files in the drop folder that are not packages
//! are refused where they can see why, the demo packages `ops/demo-release` makes run on an
//! agent set up as `ops/run-local` sets them up, and CI uploads whose event is refused do not
//! stay in the incoming store.

use fleetcast_events::AppName;
use std::time::Duration;

use fleetcast_e2e::Pipeline;
use fleetcast_e2e::TestBus;
use fleetcast_events::names::{
    EVENT_REJECTED, PACKAGE_REJECTED, RELEASE_PUBLISHED, RELEASE_STORED, archive_object,
};
use fleetcast_events::v1::{
    AgentStatus, AppState, EventRejected, PackageRejected, PackageSource, RejectCode,
    ReleasePublished, ReleaseStored,
};
use fleetcast_events::{Encoding, names};
use fleetcast_harness::fixtures::sample_package;
use fleetcast_runtime::bus::Role;
use fleetcast_runtime::{Bus, NatsSettings};
use semver::Version;
use tokio_util::sync::CancellationToken;

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

/// Whether the incoming store holds `object`.
async fn in_incoming(bus: &TestBus, object: &str) -> bool {
    match bus.incoming.store().info(object).await {
        Ok(info) => !info.deleted,
        Err(e) => {
            assert_eq!(
                e.kind(),
                async_nats::jetstream::object_store::InfoErrorKind::NotFound,
                "{e}"
            );
            false
        }
    }
}

/// Uploads a zip as CI does, under `object`.
async fn upload(bus: &TestBus, object: &str) {
    let bytes = sample_package("1.0.0").build();
    bus.incoming
        .upload_archive(object, &mut bytes.as_slice())
        .await
        .expect("upload");
    assert!(in_incoming(bus, object).await);
}

/// CI uploaded an archive, then published an event the watcher refuses: one that does not
/// decode, one whose object is not named after its hash, one with an unsafe app name. Each
/// refusal is published and the archive is gone from the incoming store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_ci_event_takes_its_archive_out_of_the_incoming_store() {
    let mut p = Pipeline::new().await.expect("pipeline");
    p.start_watcher();
    let bus = p.bus().await.expect("bus");
    let hash = "ab".repeat(32);
    let version = Version::parse("1.0.0").expect("version");

    // Does not decode (`size` is not a number), but names its archive.
    let undecodable = archive_object("collector", &version, &hash);
    upload(&bus, &undecodable).await;
    let payload = serde_json::json!({
        "app": "collector", "version": "1.0.0", "object": undecodable,
        "size": "large", "blake3": hash,
    });
    bus.js
        .publish(RELEASE_PUBLISHED, payload.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let want = undecodable.clone();
    let refused: EventRejected = p
        .wait_event(EVENT_REJECTED, move |e: &EventRejected| {
            e.subject == RELEASE_PUBLISHED && e.reason.message.contains(&want)
        })
        .await
        .expect("event rejected");
    assert_eq!(refused.reason.code, RejectCode::InvalidEvent);
    assert_eq!(refused.stage, "watcher");
    assert!(
        refused
            .reason
            .message
            .contains("removed from the incoming store"),
        "{}",
        refused.reason.message
    );
    assert!(
        !in_incoming(&bus, &undecodable).await,
        "undecodable event's archive kept"
    );

    // Decodes, but refused: not named after its hash; an unsafe app name.
    for (app, object, code) in [
        (
            "collector",
            "collector-1.0.0-latest.zip".to_string(),
            RejectCode::InvalidEvent,
        ),
        (
            "Bad App",
            archive_object("Bad App", &version, &hash),
            RejectCode::InvalidName,
        ),
    ] {
        upload(&bus, &object).await;
        let event = ReleasePublished {
            app: app.into(),
            version: version.clone(),
            object: object.clone(),
            size: 1,
            blake3: hash.clone(),
            published_by: Some(format!("test {object}")),
        };
        bus.publish_event(RELEASE_PUBLISHED, &event, Encoding::Json, None)
            .await
            .expect("publish");
        let by = event.published_by.clone();
        let rejected: PackageRejected = p
            .wait_event(PACKAGE_REJECTED, move |e: &PackageRejected| {
                matches!(&e.source, PackageSource::Ci { published_by } if *published_by == by)
            })
            .await
            .expect("package rejected");
        assert_eq!(rejected.reason.code, code, "{}", rejected.reason.message);
        assert!(!in_incoming(&bus, &object).await, "{object} kept");
    }
}

/// An archive no event ever names (CI died between upload and announce) leaves the incoming
/// store after `nats.quotas.incoming_max_age`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_no_event_names_expires_from_the_incoming_store() {
    let p = Pipeline::new().await.expect("pipeline");
    // The first to connect creates the store, with the age limit of its settings.
    let mut settings: NatsSettings = p.nats_settings();
    settings.quotas.incoming_max_age = Duration::from_secs(1);
    let bus = Bus::connect(&settings, "e2e", &CancellationToken::new())
        .await
        .expect("bus");
    let bus = TestBus::bind(&bus).await.expect("bound");
    let object = archive_object("orphan", &Version::new(1, 0, 0), &"cd".repeat(32));
    upload(&bus, &object).await;
    let info = bus
        .js
        .get_stream(format!("OBJ_{}", names::INCOMING_BUCKET))
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .config
        .max_age;
    assert_eq!(info, Duration::from_secs(1));
    // Polled (up to the e2e timeout), not timed: the server expires it on its own schedule.
    let deadline = tokio::time::Instant::now() + fleetcast_e2e::TIMEOUT;
    while in_incoming(&bus, &object).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{object} still in the incoming store"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `ops/demo-release VERSION ARGS…`, as a person runs it; its output.
fn demo_release(version: &str, args: &[&str]) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ops/demo-release");
    let out = std::process::Command::new(script)
        .arg(version)
        .args(args)
        .output()
        .expect("ops/demo-release");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ops/demo-release {version} {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// An agent set up as `ops/run-local` sets its agents up (the package's own
/// `bin/fleetcast-demo-app`), or as the compose agents are (`fleetcast-demo-app` found on PATH).
fn demo_agent(
    p: &Pipeline,
    id: &str,
    host: &std::path::Path,
    command: &str,
    path: Option<&std::path::Path>,
) -> (fleetcast_agent::Settings, u16) {
    let port = fleetcast_harness::free_port().expect("port");
    let mut settings = p.agent_settings(id, id, host);
    let app = &mut settings.apps[0];
    app.name = AppName::from_static("demo");
    app.command = vec![command.into()];
    app.env = [("FLEETCAST_DEMO_APP_PORT".to_string(), port.to_string())].into();
    if let Some(dir) = path {
        let inherited = std::env::var("PATH").unwrap_or_default();
        app.env
            .insert("PATH".into(), format!("{}:{inherited}", dir.display()));
    }
    app.health.stay_up = Duration::from_secs(1);
    app.health.http = Some(format!("http://127.0.0.1:{port}/health"));
    (settings, port)
}

/// Waits until the demo app on `port` answers `/version` with `version`.
async fn serves(port: u16, version: &str) {
    let answer = || -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        write!(
            s,
            "GET /version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        s.read_to_string(&mut response).ok()?;
        Some(response.split_once("\r\n\r\n")?.1.trim().to_string())
    };
    fleetcast_e2e::eventually(&format!("port {port} serves {version}"), || {
        answer().as_deref() == Some(version)
    })
    .await;
}

/// Waits for `agent`'s report that the demo app is in `state` at `version`; its reason.
async fn demo_status(p: &Pipeline, agent: &str, state: AppState, version: &str) -> String {
    let (agent, want) = (agent.to_string(), Version::parse(version).expect("version"));
    let status: AgentStatus = p
        .wait_status(move |s: &AgentStatus| {
            s.agent_id == agent
                && s.app == "demo"
                && s.state == state
                && s.version.as_ref() == Some(&want)
        })
        .await
        .expect("status");
    status.reason.unwrap_or_default()
}

/// Packages made by `ops/demo-release` run on a run-local agent and on a compose-style one: a
/// good version answers `/version`; `--unhealthy` and `--crash` are rolled back by the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_releases_run_on_the_local_fleet_and_misbehave_as_asked() {
    let binary = fleetcast_e2e::binaries::binary("fleetcast-demo-app");
    let mut p = Pipeline::start().await.expect("pipeline");
    let hosts = tempfile::tempdir().expect("hosts");
    let (local, local_port) = demo_agent(
        &p,
        "local",
        &hosts.path().join("local"),
        "bin/fleetcast-demo-app",
        None,
    );
    let (compose, compose_port) = demo_agent(
        &p,
        "compose",
        &hosts.path().join("compose"),
        "fleetcast-demo-app",
        binary.parent(),
    );
    p.start_agent(local);
    p.start_agent(compose);
    let drop = p.drop_dir();
    let drop_arg = drop.to_str().expect("utf-8 path");
    let binary_arg = binary.to_str().expect("utf-8 path");
    let store = |version: &'static str| {
        let p = &p;
        async move {
            let want = Version::parse(version).expect("version");
            p.wait_event(RELEASE_STORED, move |e: &ReleaseStored| {
                e.app == "demo" && e.version == want
            })
            .await
            .expect("stored")
        }
    };

    // A good release with the binary: both kinds of agent run it.
    let said = demo_release("1.0.0", &["--out", drop_arg, "--binary", binary_arg]);
    assert!(
        said.contains(&format!(
            "made {drop_arg}/demo-1.0.0.zip (demo 1.0.0: a good release)"
        )),
        "{said}"
    );
    store("1.0.0").await;
    for (agent, port) in [("local", local_port), ("compose", compose_port)] {
        p.desire("demo", agent, "1.0.0").await;
        serves(port, "1.0.0").await;
    }

    // The misbehaving ones roll back on the local agent, which keeps serving 1.0.0.
    for (version, flag, why) in [
        ("1.1.0", "--unhealthy", "503"),
        ("1.2.0", "--crash", "exited"),
    ] {
        demo_release(version, &[flag, "--out", drop_arg, "--binary", binary_arg]);
        store(version).await;
        p.desire("demo", "local", version).await;
        let reason = demo_status(&p, "local", AppState::RolledBack, version).await;
        assert!(reason.contains(why), "{version}: {reason}");
        serves(local_port, "1.0.0").await;
    }

    // Without the binary (how ops/compose/demo-release makes them): the compose agent runs it.
    let out = tempfile::tempdir().expect("out");
    let said = demo_release(
        "1.3.0",
        &[
            "--no-binary",
            "--out",
            out.path().to_str().expect("utf-8 path"),
        ],
    );
    assert!(
        said.contains(" publish ") && said.contains("--wait"),
        "{said}"
    );
    std::fs::rename(
        out.path().join("demo-1.3.0.zip"),
        drop.join("demo-1.3.0.zip"),
    )
    .expect("drop");
    store("1.3.0").await;
    p.desire("demo", "compose", "1.3.0").await;
    serves(compose_port, "1.3.0").await;
}

/// `ops/run-local` takes its ports from the environment (`--ports` prints what it would use,
/// without building or starting anything); the defaults stay as documented.
#[test]
fn run_local_takes_its_ports_from_the_environment() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ops/run-local");
    let ports = |vars: &[(&str, &str)]| {
        let out = std::process::Command::new(&script)
            .arg("--ports")
            .env_remove("FLEETCAST_NATS_PORT")
            .env_remove("FLEETCAST_WATCHER_PORT")
            .env_remove("FLEETCAST_AGENT_PORT")
            .envs(vars.iter().copied())
            .output()
            .expect("ops/run-local --ports");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let defaults = ports(&[]);
    for line in [
        "nats 4222\n",
        "nats-monitor 8222\n",
        "tracker 8430\n",
        "watcher 8431\n",
        "signer 8432\n",
        "distributor 8433\n",
        "agent local-1 off\n",
        "demo-app local-1 18080\n",
    ] {
        assert!(defaults.contains(line), "{line:?} not in {defaults}");
    }
    let moved = ports(&[
        ("FLEETCAST_NATS_PORT", "14222"),
        ("FLEETCAST_WATCHER_PORT", "18431"),
        ("FLEETCAST_AGENT_PORT", "18440"),
    ]);
    for line in [
        "nats 14222\n",
        "nats-monitor 18222\n",
        "watcher 18431\n",
        "signer 8432\n",
        "agent local-1 18440\n",
        "agent local-3 18442\n",
    ] {
        assert!(moved.contains(line), "{line:?} not in {moved}");
    }
    let refused = std::process::Command::new(&script)
        .arg("--ports")
        .env("FLEETCAST_TRACKER_PORT", "http")
        .output()
        .expect("ops/run-local --ports");
    assert_eq!(refused.status.code(), Some(2));
}
