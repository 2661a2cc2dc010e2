//! Rebuilt binary (part of `ops/bench agent`): two release builds of a real Rust program of
//! this workspace, the demo app, with a small source change between them (one line added to
//! `main`, which moves the code after it). Built once into `target/bench-rebuilt/` from a copy
//! of its source in a workspace of its own (same locked dependencies), and reused.
//!
//! - `rebuilt_fetched_bytes`: everything the agent fetched to update from build 1 to build 2
//!   (the desired state with its signed manifest, tree nodes, the patch list, patches, chunks).
//! - `rebuilt_patch_from_bytes`: `zstd --patch-from -19 --long` of the same pair, the zstd CLI,
//!   in the same run (the reference).
//! - `rebuilt_full_bytes`: build 2 compressed alone by the same CLI (`zstd -19 --long`).
//! - `rebuilt_binary_bytes`: build 2's size.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use fleetcast_cli::CliBus;
use fleetcast_events::names::{PATCHES_WANTED, chunk_subject};
use fleetcast_events::patches::{PatchList, list_key};
use fleetcast_events::v1::PatchesWanted;

/// The source edit between the two builds.
const EDIT_AT: &str = "fn main() -> ExitCode {\n";
const EDIT: &str =
    "fn main() -> ExitCode {\n    eprintln!(\"demo app, rebuilt with one more line\");\n";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The two builds (cached): build 1 as the workspace has it, build 2 with [`EDIT`].
pub(crate) fn builds() -> anyhow::Result<(PathBuf, PathBuf)> {
    let root = workspace_root().canonicalize()?;
    let cache = root.join("target/bench-rebuilt");
    let out = (cache.join("build-1"), cache.join("build-2"));
    if out.0.is_file() && out.1.is_file() {
        return Ok(out);
    }
    eprintln!(
        "building the demo app twice into {} (once)",
        cache.display()
    );
    let ws = cache.join("ws");
    std::fs::create_dir_all(ws.join("src"))?;
    std::fs::write(ws.join("Cargo.toml"), manifest(&root)?)?;
    std::fs::copy(root.join("Cargo.lock"), ws.join("Cargo.lock"))?;
    let source = std::fs::read_to_string(root.join("services/demo-app/src/main.rs"))?;
    if !source.contains(EDIT_AT) {
        bail!("the demo app's main changed: update EDIT_AT in rebuilt.rs");
    }
    for (source, dest) in [
        (source.clone(), &out.0),
        (source.replacen(EDIT_AT, EDIT, 1), &out.1),
    ] {
        std::fs::write(ws.join("src/main.rs"), source)?;
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--release", "--manifest-path"])
            .arg(ws.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", cache.join("target"))
            .status()?;
        if !status.success() {
            bail!("building the demo app failed");
        }
        std::fs::copy(cache.join("target/release/fleetcast-demo-app"), dest)?;
    }
    Ok(out)
}

/// The demo app's manifest, standing alone: its dependencies as the workspace pins them
/// (paths made absolute), the workspace's release profile.
fn manifest(root: &Path) -> anyhow::Result<String> {
    let workspace: toml::Table =
        toml::from_str(&std::fs::read_to_string(root.join("Cargo.toml"))?)?;
    let app: toml::Table = toml::from_str(&std::fs::read_to_string(
        root.join("services/demo-app/Cargo.toml"),
    )?)?;
    let pinned = workspace
        .get("workspace")
        .and_then(|w| w.get("dependencies"))
        .and_then(|d| d.as_table())
        .context("no [workspace.dependencies]")?;
    let mut deps = toml::Table::new();
    for (name, own) in app
        .get("dependencies")
        .and_then(|d| d.as_table())
        .context("no [dependencies]")?
    {
        let mut spec = match pinned
            .get(name)
            .with_context(|| format!("{name} not pinned by the workspace"))?
        {
            toml::Value::String(version) => {
                toml::Table::from_iter([("version".to_string(), version.clone().into())])
            }
            toml::Value::Table(table) => table.clone(),
            other => bail!("{name}: unexpected workspace dependency {other}"),
        };
        if let Some(path) = spec.get("path").and_then(|p| p.as_str()) {
            let absolute = root.join(path).to_string_lossy().into_owned();
            spec.insert("path".into(), absolute.into());
        }
        // The app's own features add to the workspace's (`{ workspace = true, features = … }`).
        if let Some(extra) = own.get("features").and_then(|f| f.as_array()) {
            let mut features = spec
                .get("features")
                .and_then(|f| f.as_array())
                .cloned()
                .unwrap_or_default();
            features.extend(extra.iter().cloned());
            spec.insert("features".into(), features.into());
        }
        deps.insert(name.clone(), spec.into());
    }
    let mut doc = toml::Table::new();
    let mut package = toml::Table::new();
    package.insert("name".into(), "fleetcast-demo-app".into());
    package.insert("version".into(), "0.0.0".into());
    package.insert("edition".into(), "2024".into());
    package.insert("publish".into(), false.into());
    doc.insert("package".into(), package.into());
    doc.insert("dependencies".into(), deps.into());
    if let Some(profile) = workspace.get("profile") {
        doc.insert("profile".into(), profile.clone());
    }
    doc.insert("workspace".into(), toml::Table::new().into());
    Ok(toml::to_string(&doc)?)
}

/// `zstd -19 --long`, with `--patch-from` when `base` is given: the compressed size.
pub(crate) fn zstd_cli(base: Option<&Path>, file: &Path, dir: &Path) -> anyhow::Result<u64> {
    let out = dir.join("zstd-out");
    let mut cmd = Command::new("zstd");
    cmd.args(["-q", "-f", "-19", "--long"]);
    if let Some(base) = base {
        cmd.arg(format!("--patch-from={}", base.display()));
    }
    let status = cmd
        .arg(file)
        .arg("-o")
        .arg(&out)
        .status()
        .context("running the zstd CLI (apt-get install zstd)")?;
    if !status.success() {
        bail!("zstd failed");
    }
    Ok(std::fs::metadata(&out)?.len())
}

/// Asks for `version`'s patches from `base` (as the tracker does once its fleet runs `base`)
/// and waits until the distributor has listed them.
pub(crate) async fn wait_patches(
    bus: &CliBus,
    app: &str,
    version: &str,
    base: &str,
    tree_root: &str,
) -> anyhow::Result<PatchList> {
    let wanted = PatchesWanted {
        app: fleetcast_events::AppName::try_from(app)?,
        version: semver::Version::parse(version)?,
        bases: vec![semver::Version::parse(base)?],
    };
    bus.publish_event(
        PATCHES_WANTED,
        &wanted,
        fleetcast_events::Encoding::Json,
        None,
    )
    .await?;
    let subject = chunk_subject(app, &list_key(tree_root));
    let chunks = bus.stream(fleetcast_events::names::CHUNKS_STREAM).await?;
    for _ in 0..1200 {
        if let Ok(message) = chunks.direct_get_last_for_subject(subject.clone()).await {
            return Ok(PatchList::decode(&message.payload)?);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no patch list for {app} {version} after 2 minutes")
}
