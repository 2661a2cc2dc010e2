//! The root of trust and freshness end to end: keys rotate and are revoked through published
//! roots while agents keep the config they started with; a manifest signed by a revoked key or
//! by too few keys is refused; an agent whose timestamps stop coming reports stale metadata and
//! the tracker shows it.

use fleetcast_events::{AppName, RingName};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetcast_cli::root;
use fleetcast_e2e::checks::{poll, status_of};
use fleetcast_e2e::{Pipeline, eventually, running, script_app};
use fleetcast_events::v1::{AppState, DesiredState};
use fleetcast_events::{Encoding, Manifest, Role, SecretKey, SignedManifest, SignedMetadata};
use semver::Version;

fn v(s: &str) -> Version {
    Version::parse(s).expect("version")
}

fn key_file(dir: &Path, name: &str) -> (SecretKey, PathBuf) {
    let key = SecretKey::generate().expect("key");
    let path = dir.join(format!("{name}.key"));
    std::fs::write(&path, key.to_text()).expect("write key");
    // The signer refuses a key others can read.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod key");
    (key, path)
}

fn role(keys: &[&SecretKey], threshold: usize) -> Role {
    Role {
        keys: keys.iter().map(|k| k.public().to_text()).collect(),
        threshold,
    }
}

/// A root of `version` signed by `by` (offline, as `fleetcast root sign` does).
fn signed_root(version: u64, root_keys: Role, signing: Role, by: &[&SecretKey]) -> SignedMetadata {
    let mut signed =
        root::new_root(version, root_keys, signing, Duration::from_secs(3600)).expect("root");
    for key in by {
        signed.add_signature(key);
    }
    signed
}

/// Announces `version` of `shapp` to ring `default` with a manifest re-signed by `keys`.
async fn announce_signed_by(p: &Pipeline, like: &str, version: &str, keys: &[&SecretKey]) {
    let bus = p.bus().await.expect("bus");
    let stored = bus
        .records
        .release_record("shapp", &v(like))
        .await
        .expect("record")
        .and_then(|r| r.manifest)
        .expect("manifest");
    let mut manifest: Manifest = serde_json::from_str(&stored.manifest).expect("manifest json");
    manifest.version = v(version);
    let desired = DesiredState {
        app: AppName::from_static("shapp"),
        ring: RingName::from_static("default"),
        version: v(version),
        manifest: SignedManifest::sign(&manifest, keys).expect("sign"),
        slot: false,
    };
    bus.desired
        .put(
            fleetcast_events::names::desired_key("shapp", "default"),
            Encoding::Json.encode(&desired).expect("encode").into(),
        )
        .await
        .expect("put");
}

async fn refusal(p: &Pipeline, version: &str) -> String {
    let status = status_of(p, AppState::Refused, version).await;
    status.reason.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_keys_rotate_and_are_revoked_through_the_root_without_touching_agents() {
    // On the heap: the whole scenario's future is too large for a test thread's stack.
    Box::pin(rotation_and_revocation()).await;
}

async fn rotation_and_revocation() {
    let mut p = Pipeline::new().await.expect("pipeline");
    let keys = p.dir.path().join("keys");
    let root_keys: Vec<SecretKey> = (0..3)
        .map(|_| SecretKey::generate().expect("key"))
        .collect();
    let [r0, r1, r2] = [&root_keys[0], &root_keys[1], &root_keys[2]];
    let roots = role(&[r0, r1, r2], 2);

    // Root 1: the pipeline's key signs releases. Every verifier is configured with this file
    // only, and never again.
    let first = signed_root(1, roots.clone(), role(&[&p.key], 1), &[r0, r1]);
    let first_file = p.dir.path().join("root-1.json");
    root::write(&first_file, &first).expect("write root");
    // No service runs yet: the tests' own connection creates the stores, then the operator's
    // command publishes.
    p.bus().await.expect("stores");
    let bus = p.cli().await.expect("bus");
    let (_, published) = Box::pin(root::publish(&bus, &first))
        .await
        .expect("publish root 1");
    assert!(published);
    let (_, again) = Box::pin(root::publish(&bus, &first))
        .await
        .expect("publishing the same root again is a no-op");
    assert!(!again);

    let base = fleetcast_signer::Settings {
        trusted_root_file: Some(first_file.clone()),
        ..p.signer_settings()
    };
    let signer = |key: PathBuf, extra: Vec<PathBuf>| fleetcast_signer::Settings {
        key_file: key,
        extra_key_files: extra,
        ..base.clone()
    };
    p.start_watcher();
    p.start_signer_with(signer(keys.join("signing.key"), vec![]));
    p.start_distributor_with(
        "distributor",
        fleetcast_distributor::Settings {
            trusted_keys: vec![],
            trusted_root_file: Some(first_file.clone()),
            ..p.distributor_settings()
        },
    );
    let host = tempfile::tempdir().expect("host");
    let mut agent = p.agent_settings("host-1", "default", host.path());
    agent.trusted_keys.clear();
    agent.trusted_root_file = Some(first_file.clone());
    let state = host.path().join("state");
    p.start_agent(agent.clone());
    Box::pin(p.release("shapp", "1.0.0", &script_app("1.0.0", true))).await;
    Box::pin(p.desire("shapp", "default", "1.0.0")).await;
    eventually("1.0.0 runs", || running(&state) == "1.0.0").await;

    // Root 2 rotates to a new signing key and so revokes the old one. A root signed by too few
    // of the current root keys is refused before it is published.
    let (k2, k2_file) = key_file(&keys, "k2");
    let below = signed_root(2, roots.clone(), role(&[&k2], 1), &[r2]);
    let refused = Box::pin(root::publish(&bus, &below))
        .await
        .expect_err("below threshold");
    assert!(format!("{refused:#}").contains("2 needed"), "{refused:#}");
    let second = signed_root(2, roots.clone(), role(&[&k2], 1), &[r1, r2]);
    Box::pin(root::publish(&bus, &second))
        .await
        .expect("publish root 2");
    p.start_signer_with(signer(k2_file.clone(), vec![]));
    Box::pin(p.release("shapp", "2.0.0", &script_app("2.0.0", true))).await;
    Box::pin(p.desire("shapp", "default", "2.0.0")).await;
    eventually("2.0.0 runs under the rotated key", || {
        running(&state) == "2.0.0"
    })
    .await;

    // The revoked key (the pipeline's first) signs a newer version: refused.
    Box::pin(announce_signed_by(&p, "2.0.0", "2.5.0", &[&p.key])).await;
    let reason = Box::pin(refusal(&p, "2.5.0")).await;
    assert!(reason.contains("not trusted"), "{reason}");

    // Root 3 asks for two signing keys: one is not enough, the signer holding both is.
    let (k3, k3_file) = key_file(&keys, "k3");
    let third = signed_root(3, roots.clone(), role(&[&k2, &k3], 2), &[r0, r2]);
    Box::pin(root::publish(&bus, &third))
        .await
        .expect("publish root 3");
    p.start_signer_with(signer(k2_file, vec![k3_file]));
    Box::pin(p.release("shapp", "3.0.0", &script_app("3.0.0", true))).await;
    Box::pin(p.desire("shapp", "default", "3.0.0")).await;
    eventually("3.0.0 runs with two signatures", || {
        running(&state) == "3.0.0"
    })
    .await;
    Box::pin(announce_signed_by(&p, "3.0.0", "3.5.0", &[&k2])).await;
    let reason = Box::pin(refusal(&p, "3.5.0")).await;
    assert!(reason.contains("2 needed"), "{reason}");

    // The agent keeps each root it reached outside its install folders; restarted with the same
    // config (root 1), it still refuses what root 3 revoked.
    p.stop("agent-host-1").await;
    let kept: SignedMetadata = serde_json::from_slice(
        &std::fs::read(host.path().join("data/trust/root.3.json")).expect("persisted root"),
    )
    .expect("root json");
    assert_eq!(kept, third);
    p.start_agent(agent);
    Box::pin(announce_signed_by(&p, "3.0.0", "3.6.0", &[&p.key])).await;
    let reason = Box::pin(refusal(&p, "3.6.0")).await;
    assert!(reason.contains("not trusted"), "{reason}");
    assert_eq!(running(&state), "3.0.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_timestamps_stop_reports_stale_metadata_and_the_tracker_shows_it() {
    use fleetcast_events::tracker::Command;

    let mut p = Pipeline::new().await.expect("pipeline");
    let signer = fleetcast_signer::Settings {
        timestamp_interval: Duration::from_secs(1),
        timestamp_ttl: Duration::from_secs(30),
        ..p.signer_settings()
    };
    p.start_signer_with(signer.clone());
    let port = fleetcast_e2e::free_addr().port();
    p.start_tracker_with(fleetcast_tracker::Settings {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        ..p.tracker_settings()
    });
    let host = tempfile::tempdir().expect("host");
    let mut agent = p.agent_settings("host-1", "default", host.path());
    agent.max_metadata_age = Duration::from_secs(3);
    p.start_agent(agent);

    let metadata = async |p: &Pipeline| {
        // The tracker may not answer yet: asked again.
        let reply = p.tracker_command(&Command::Status).await.ok()?;
        reply
            .agents
            .iter()
            .find(|a| a.agent_id == "host-1")
            .and_then(|a| a.metadata.clone())
    };
    let fresh = poll(Duration::from_millis(200), async || {
        match metadata(&p).await {
            Some(m) if m.timestamp.is_some() && !m.stale => Ok(m),
            _ => Err("never fresh".to_string()),
        }
    })
    .await;
    assert_eq!(fresh.root_version, 0, "pinned keys");

    // Timestamps stop, as when a broker withholds what the signer publishes.
    p.stop("signer").await;
    let stale = poll(Duration::from_millis(200), async || {
        match metadata(&p).await {
            Some(m) if m.stale => Ok(m),
            _ => Err("never stale".to_string()),
        }
    })
    .await;
    let reason = stale.reason.unwrap_or_default();
    assert!(reason.contains("withheld"), "{reason}");
    // As an operator sees it: marked on the dashboard, counted in the metrics.
    let dom = fleetcast_e2e::dashboard_dom(port).await;
    assert!(dom.contains("1 with stale metadata"), "{dom}");
    assert!(
        dom.contains("stale metadata: no timestamp")
            || dom.contains("stale metadata: the newest timestamp"),
        "{dom}"
    );
    let metrics = fleetcast_e2e::http_get(port, "/metrics");
    assert!(
        metrics.contains("fleetcast_agents_stale_metadata 1"),
        "{metrics}"
    );

    // The signer's timestamps come back: fresh again.
    p.start_signer_with(signer);
    poll(Duration::from_millis(200), async || {
        match metadata(&p).await {
            Some(m) if !m.stale => Ok(()),
            _ => Err("never fresh again".to_string()),
        }
    })
    .await;
}
