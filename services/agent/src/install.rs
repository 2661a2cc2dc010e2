//! The layout of one app on a host, and the only two operations that change what runs:
//!
//! ```text
//! <root>/versions/<v>.partial/   being assembled (never run)
//! <root>/versions/<v>/           complete and verified
//! <root>/meta/<v>/               its signed manifest and chunk index (for reuse and audit)
//! <root>/current -> versions/<v> what runs; switched by an atomic rename of a new symlink
//! ```
//!
//! Only the agent writes here: `<root>` and `versions/` are 0711 (an app running as its own
//! user passes through to its version, lists and changes nothing), an installed version is
//! sealed read-only (see [`crate::isolation`]) and unsealed only to be pruned.

use std::io;
use std::path::{Path, PathBuf};

use semver::Version;

#[derive(Debug, Clone)]
pub struct InstallRoot {
    root: PathBuf,
}

impl InstallRoot {
    pub fn new(root: impl Into<PathBuf>) -> io::Result<InstallRoot> {
        let root = root.into();
        std::fs::create_dir_all(root.join("versions"))?;
        std::fs::create_dir_all(root.join("meta"))?;
        for dir in [root.clone(), root.join("versions")] {
            crate::isolation::ensure_mode(&dir, crate::isolation::PASS_THROUGH)?;
        }
        Ok(InstallRoot { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn version_dir(&self, v: &Version) -> PathBuf {
        self.root.join("versions").join(v.to_string())
    }

    pub fn partial_dir(&self, v: &Version) -> PathBuf {
        self.root.join("versions").join(format!("{v}.partial"))
    }

    pub fn meta_dir(&self, v: &Version) -> PathBuf {
        self.root.join("meta").join(v.to_string())
    }

    fn current_link(&self) -> PathBuf {
        self.root.join("current")
    }

    /// The version `current` points to, if any.
    pub fn current(&self) -> Option<Version> {
        let target = std::fs::read_link(self.current_link()).ok()?;
        Version::parse(target.file_name()?.to_str()?).ok()
    }

    /// Complete versions on disk (partial folders excluded), oldest first.
    pub fn installed(&self) -> Vec<Version> {
        let mut out: Vec<Version> = std::fs::read_dir(self.root.join("versions"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Version::parse(e.file_name().to_str()?).ok())
            .collect();
        out.sort();
        out
    }

    /// Points `current` at `v` atomically: a new symlink under a temporary name renamed over
    /// the old one, then the folder is synced. A crash leaves either the old or the new link.
    pub fn switch_to(&self, v: &Version) -> io::Result<()> {
        let target = self.version_dir(v);
        if !target.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not installed", target.display()),
            ));
        }
        let tmp = self.root.join(".current.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(Path::new("versions").join(v.to_string()), &tmp)?;
        std::fs::rename(&tmp, self.current_link())?;
        sync_dir(&self.root)
    }

    /// Keeps the newest `keep` complete versions plus those in `protect` (current, previous).
    pub fn prune(&self, keep: usize, protect: &[Version]) -> io::Result<Vec<Version>> {
        let installed = self.installed();
        let excess = installed.len().saturating_sub(keep);
        let mut removed = Vec::new();
        for v in installed.into_iter().take(excess) {
            if protect.contains(&v) {
                continue;
            }
            crate::isolation::remove_installed(&self.version_dir(&v))?;
            let _ = std::fs::remove_dir_all(self.meta_dir(&v));
            removed.push(v);
        }
        sync_dir(&self.root.join("versions"))?;
        Ok(removed)
    }
}

pub use fleetcast_runtime::fs::sync_dir;

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).expect("version")
    }

    #[test]
    fn switch_and_prune() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = InstallRoot::new(dir.path()).expect("root");
        assert_eq!(root.current(), None);
        for ver in ["1.0.0", "1.1.0", "2.0.0"] {
            std::fs::create_dir_all(root.version_dir(&v(ver))).expect("dir");
        }
        std::fs::create_dir_all(root.partial_dir(&v("3.0.0"))).expect("partial");
        assert!(
            root.switch_to(&v("3.0.0")).is_err(),
            "switched to a partial version"
        );
        root.switch_to(&v("1.1.0")).expect("switch");
        root.switch_to(&v("2.0.0")).expect("switch");
        assert_eq!(root.current(), Some(v("2.0.0")));
        assert!(dir.path().join("current").join(".").is_dir());
        assert_eq!(root.installed(), vec![v("1.0.0"), v("1.1.0"), v("2.0.0")]);
        // Installed versions are sealed read-only: pruning still removes them.
        for ver in ["1.0.0", "1.1.0", "2.0.0"] {
            let dir = root.version_dir(&v(ver));
            std::fs::create_dir_all(dir.join("bin")).expect("dir");
            std::fs::write(dir.join("bin/run"), "x").expect("file");
            crate::isolation::set_mode(&dir.join("bin/run"), 0o555).expect("mode");
            crate::isolation::seal_tree(&dir).expect("seal");
        }
        let removed = root.prune(2, &[v("2.0.0"), v("1.1.0")]).expect("prune");
        assert_eq!(removed, vec![v("1.0.0")]);
        assert_eq!(root.installed(), vec![v("1.1.0"), v("2.0.0")]);
    }
}
