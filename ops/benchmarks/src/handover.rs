//! Socket hand-over (part of `ops/bench agent`): two more apps of the same agent, both the demo
//! app, one with its listening socket held by the agent (`apps.listen`), one binding its port
//! itself. Each is installed at 1.0.0, then a steady loopback load (one `GET /version` after
//! another, a millisecond apart, each given 10 s to be answered) runs across an update to 2.0.0
//! and a release 3.0.0 that fails its health check and is rolled back to 2.0.0. Each version
//! drains for 100 ms on stop.
//!
//! - `handover_refused_requests`: requests refused or failed with the hand-over (goal 0).
//! - `plain_refused_requests`: the same without it, the reference.
//! - `handover_requests`, `plain_requests`: how many were made.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::bail;
use fleetcast_events::v1::AppState;

use crate::agent::{http_get_within, next_status, wait_committed, wait_running};
use crate::ingest::{File, write_zip};

/// The two apps: (name, whether the agent holds its socket).
pub(crate) const APPS: [(&str, bool); 2] = [("handover", true), ("plain", false)];

/// The demo app's releases for `app`: (zip, version), 3.0.0 failing its health check.
pub(crate) fn packages(dir: &Path, app: &str) -> anyhow::Result<Vec<(std::path::PathBuf, String)>> {
    let mut out = Vec::new();
    for (version, env) in [
        ("1.0.0", ""),
        ("2.0.0", ""),
        ("3.0.0", "FLEETCAST_DEMO_APP_FAIL_HEALTH = \"true\"\n"),
    ] {
        let zip = dir.join(format!("{app}-{version}.zip"));
        write_zip(
            &[
                File::text("VERSION", version),
                File::text("fleetcast.toml", &format!("[env]\n{env}")),
            ],
            &zip,
        )?;
        out.push((zip, version.to_string()));
    }
    Ok(out)
}

/// The agent's config for `app` on `port`: drained 100 ms before it stops, and given 1 s to
/// be healthy.
pub(crate) fn app_config(app: &str, hand_over: bool, port: u16, demo_app: &Path) -> String {
    let drain = "FLEETCAST_DEMO_APP_DRAIN = \"100ms\"\n";
    crate::agent::demo_app_config(app, port, hand_over, drain, 200, demo_app)
}

/// (requests made, requests refused or failed) across the update and the rollback of `app`.
pub(crate) async fn under_load(
    bus: &fleetcast_cli::CliBus,
    statuses: &mut async_nats::Subscriber,
    data: &Path,
    app: &str,
    port: u16,
) -> anyhow::Result<(u64, u64)> {
    let journal = data.join("apps").join(app);
    desire(bus, app, 1).await?;
    wait_running(statuses, app, "1.0.0").await?;
    wait_committed(&journal, "1.0.0").await?;

    let load = Load::start(port);
    desire(bus, app, 2).await?;
    wait_running(statuses, app, "2.0.0").await?;
    wait_committed(&journal, "2.0.0").await?;
    desire(bus, app, 3).await?;
    loop {
        let s = next_status(statuses).await?;
        let three = s.version.as_ref().is_some_and(|v| v.major == 3);
        if s.app == app && three && s.state == AppState::RolledBack {
            break;
        }
        if s.app == app && three && s.state == AppState::Running {
            bail!("{app} 3.0.0 passed a health check it fails");
        }
    }
    // Back on 2.0.0 and answering.
    for _ in 0..1000 {
        if http_get_within(port, "/version", Duration::from_secs(1)).as_deref() == Some("2.0.0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    load.finish().await
}

/// A steady loopback load on `port`: one `GET /version` after another, a millisecond apart,
/// each given 10 s to be answered.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
}

impl Load {
    pub(crate) fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut made, mut failed) = (0u64, 0u64);
            while !flag.load(Ordering::Relaxed) {
                made += 1;
                if http_get_within(port, "/version", Duration::from_secs(10)).is_none() {
                    failed += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (made, failed)
        });
        Load { stop, thread }
    }

    /// (requests made, requests refused or failed).
    pub(crate) async fn finish(self) -> anyhow::Result<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("load thread panicked"))
    }
}

async fn desire(bus: &fleetcast_cli::CliBus, app: &str, major: u64) -> anyhow::Result<()> {
    crate::agent::desire(bus, app, &semver::Version::new(major, 0, 0)).await?;
    Ok(())
}
