//! The shipped agent binary as `ops/host/fleetcast-agent.service` runs it: a user of its own
//! (not root) holding CAP_SETUID, CAP_SETGID, CAP_KILL and CAP_CHOWN as ambient capabilities,
//! no-new-privileges set (here with `setpriv`, as systemd would). Its app runs as `nobody`
//! with no capability at all (the agent lowers its ambient ones before it starts anything),
//! gets its data folder, is updated and pruned through sealed installs with the agent's
//! owner rights only, and is stopped by the agent when it stops.
//!
//! Needs root (to start the agent as another user) and `setpriv` (util-linux); CI runs the
//! tests as root. Run as anyone else, the test fails and says so.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use fleetcast_e2e::{Pipeline, eventually};
use fleetcast_harness::fixtures::PackageBuilder;

/// The agent's own user: any uid without an entry works for the kernel.
const AGENT_UID: u32 = 61_000;
const NOBODY: u32 = 65534;
/// CAP_CHOWN, CAP_KILL, CAP_SETGID, CAP_SETUID.
const AGENT_CAPS: u64 = 1 | (1 << 5) | (1 << 6) | (1 << 7);

fn probe_app(version: &str) -> PackageBuilder {
    let run = format!(
        r#"#!/bin/sh
d="$FLEETCAST_DATA_DIR"
{{
    echo "pid $$"
    echo "uid $(id -u)"
    grep -E '^(CapEff|CapPrm|CapAmb|CapInh):' /proc/self/status
}} > "$d/probe.tmp"
mv "$d/probe.tmp" "$d/probe-{version}"
exec sleep 300
"#
    );
    PackageBuilder::new()
        .file("bin/run", run, 0o755)
        .file("VERSION", version.to_string(), 0o644)
}

/// A `Key: hex` line of a `/proc/<pid>/status`.
fn caps(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no {key} in {status}"))
}

struct Agent(Child);

impl Drop for Agent {
    /// A failed test still stops the agent the way systemd would, so it stops its app (which
    /// runs as another user, in its own process group) instead of leaving it behind.
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            for _ in 0..100 {
                if !matches!(self.0.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).expect("string")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_apps_as_their_users_without_root_and_passes_on_no_capability() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: it starts the agent as uid {AGENT_UID} with the unit's \
         capabilities (setpriv); run the tests as root (CI does)"
    );
    let p = Pipeline::start().await.expect("pipeline");
    let host_guard = tempfile::tempdir().expect("tmp");
    let host = host_guard.path();
    // The host's folder, as /var/lib/fleetcast: the agent's own, passable for apps.
    std::os::unix::fs::chown(host, Some(AGENT_UID), Some(AGENT_UID)).expect("chown");
    std::fs::set_permissions(host, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let data_dir = host.join("data");
    let config = host_guard.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"agent_id = "unpriv-1"
data_dir = {data}
trusted_keys = [{key}]
keep_versions = 2
heartbeat = "1s"
fetch_delay = "0s"

[nats]
url = {url}
# The test server on 127.0.0.1 has no accounts and no TLS.
insecure_dev = true

[[apps]]
name = "shapp"
command = ["bin/run"]
user = "nobody"
grace = "2s"
[apps.health]
stay_up = "300ms"
"#,
            data = toml_string(&data_dir.display().to_string()),
            key = toml_string(&p.key.public().to_text()),
            url = toml_string(&p.nats_settings().url),
        ),
    )
    .expect("config");
    let log = std::fs::File::create(host.join("agent.log")).expect("log");
    let agent = Command::new("setpriv")
        .args([
            &format!("--reuid={AGENT_UID}"),
            &format!("--regid={AGENT_UID}"),
            "--clear-groups",
            "--inh-caps=-all,+setuid,+setgid,+kill,+chown",
            "--ambient-caps=+setuid,+setgid,+kill,+chown",
            "--bounding-set=-all,+setuid,+setgid,+kill,+chown",
            "--no-new-privs",
            "--",
        ])
        .arg(fleetcast_e2e::binaries::binary("fleetcast-agent"))
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("setpriv (util-linux) runs the agent");
    let mut agent = Agent(agent);
    let agent_log = || std::fs::read_to_string(host.join("agent.log")).unwrap_or_default();

    let own = data_dir.join("apps/shapp/data");
    let mut app_pids = Vec::new();
    for version in ["1.0.0", "2.0.0", "3.0.0"] {
        p.release("shapp", version, &probe_app(version)).await;
        p.desire("shapp", "default", version).await;
        let probe = own.join(format!("probe-{version}"));
        eventually(&format!("{version} runs"), || probe.exists()).await;
        let lines = std::fs::read_to_string(&probe).expect("probe");
        assert!(lines.contains(&format!("uid {NOBODY}\n")), "{lines}");
        for set in ["CapEff", "CapPrm", "CapAmb", "CapInh"] {
            assert_eq!(caps(&lines, set), 0, "the app holds capabilities: {lines}");
        }
        let pid: u32 = lines
            .lines()
            .find_map(|l| l.strip_prefix("pid "))
            .and_then(|p| p.parse().ok())
            .expect("pid");
        app_pids.push(pid);
    }
    // The agent itself: not root, still holding its four, none left ambient.
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", agent.0.id())).expect("agent status");
    assert!(
        status.contains(&format!("Uid:\t{AGENT_UID}\t")),
        "the agent is not the expected user: {status}"
    );
    assert_eq!(caps(&status, "CapEff"), AGENT_CAPS, "{status}");
    assert_eq!(caps(&status, "CapAmb"), 0, "{status}");
    // The data folder was handed to the app; versions sealed and pruned by a non-root owner.
    let meta = std::fs::metadata(&own).expect("data folder");
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (NOBODY, 0o700));
    let versions = data_dir.join("apps/shapp/versions");
    eventually("1.0.0 pruned", || !versions.join("1.0.0").exists()).await;
    for version in ["2.0.0", "3.0.0"] {
        let dir = versions.join(version);
        let mode = std::fs::metadata(&dir).expect("installed").mode() & 0o7777;
        assert_eq!(mode, 0o555, "{}", dir.display());
        assert_eq!(std::fs::metadata(&dir).expect("owner").uid(), AGENT_UID);
    }
    // Older versions were stopped (a signal to another user's process group: CAP_KILL).
    for pid in &app_pids[..2] {
        let gone = || !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(*pid);
        eventually(&format!("app process {pid} stopped"), gone).await;
    }

    // Stopping the agent stops its app.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal the agent");
    let exit = tokio::task::spawn_blocking(move || {
        let status = agent.0.wait();
        (agent, status)
    })
    .await
    .expect("join");
    let (_agent, status) = exit;
    assert!(
        status.expect("agent exit").success(),
        "agent log:\n{}",
        agent_log()
    );
    let last = app_pids[2];
    assert!(
        !Path::new(&format!("/proc/{last}")).exists() || is_zombie(last),
        "the app outlived the agent; agent log:\n{}",
        agent_log()
    );
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}
