//! What the agent's tests with real processes share: small shell scripts as the apps, and
//! how long the supervisor lets them drain.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use fleetcast_agent::supervisor::{ProcessSpec, StopPolicy};

/// `sh -c body` run in `dir`, with no environment of its own, as the agent's own user.
pub fn shell(dir: &Path, body: &str) -> ProcessSpec {
    ProcessSpec {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), body.into()],
        env: BTreeMap::new(),
        cwd: dir.to_path_buf(),
        run_as: None,
        verify: None,
        sockets: None,
    }
}

/// The default stop, with `grace` to drain before the app is killed.
pub fn grace(grace: Duration) -> StopPolicy {
    StopPolicy {
        grace,
        ..Default::default()
    }
}
