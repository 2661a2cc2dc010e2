//! The workspace's programs, for the tests that run them as processes (the agent under its
//! launcher, the `fleetcast` command, the demo app). A test can name only its own package's
//! binaries with `CARGO_BIN_EXE_…`, so these are built here with cargo: fresh whichever tests
//! were asked for, and the agent with the fault points exactly when the agent library this test
//! links has them (the crash matrix aborts only a binary built with them). Built as the test
//! runner builds the workspace (`ops/test`: every target, the same features), so that after it
//! cargo finds them up to date instead of building them again with another feature set.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The programs tests run.
const PROGRAMS: &[&str] = &[
    "fleetcast-agent",
    "fleetcast-launcher",
    "fleetcast",
    "fleetcast-demo-app",
];

/// The path of the workspace binary `name` (`fleetcast-agent`, `fleetcast-launcher`,
/// `fleetcast`, `fleetcast-demo-app`), built on the first call in this process.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<HashMap<String, PathBuf>> = OnceLock::new();
    BUILT
        .get_or_init(build)
        .get(name)
        .cloned()
        .unwrap_or_else(|| panic!("no binary {name} among {PROGRAMS:?}"))
}

fn build() -> HashMap<String, PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Only what cargo needs: variables the test runner sets for this test would make cargo
    // rebuild dependencies whose build scripts watch them.
    let keep = [
        "PATH",
        "HOME",
        "CARGO_HOME",
        "RUSTUP_HOME",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "CARGO_INCREMENTAL",
        "RUSTFLAGS",
    ];
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--workspace",
        "--all-targets",
        "--message-format=json-render-diagnostics",
    ])
    .current_dir(&workspace)
    .env_clear()
    .envs(std::env::vars().filter(|(k, _)| keep.contains(&k.as_str())));
    if fleetcast_agent::fault::ENABLED {
        cmd.args(["--features", "fleetcast-agent/fault-points"]);
    }
    let out = cmd.output().expect("cargo build");
    assert!(
        out.status.success(),
        "cargo build of {PROGRAMS:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The paths as cargo reports them: right whatever the target folder or profile.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        // The programs, not their unit tests (built too, under the same target name).
        .filter(|m| m["target"]["kind"][0] == "bin" && m["profile"]["test"] == false)
        .filter_map(|m| {
            let name = m["target"]["name"].as_str()?.to_string();
            if !PROGRAMS.contains(&name.as_str()) {
                return None;
            }
            let exe = m["executable"].as_str()?;
            Some((name, PathBuf::from(exe)))
        })
        .collect()
}
