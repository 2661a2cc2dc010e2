//! Packages no host can install, refused at the pipeline rather than retried for ever by every
//! agent of a ring: a name or path longer than Linux filesystems take, a name that is both a
//! file and a folder, a package with no file at all. Names differing only in case install on
//! Linux but not on a case-insensitive filesystem: found, and refused when the limits say so.

use std::collections::{BTreeMap, HashSet};

/// The longest file name Linux filesystems take (`NAME_MAX`, in bytes).
pub const MAX_NAME_BYTES: usize = 255;
/// The longest path the kernel takes (`PATH_MAX`, in bytes). The install folder's own path comes
/// on top on the host; a package path this long is refused whatever the prefix.
pub const MAX_PATH_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Uninstallable {
    #[error("{path:?} has a name of {len} bytes; filesystems take at most {MAX_NAME_BYTES}")]
    NameTooLong { path: String, len: usize },
    #[error("{path:?} is {len} bytes long; paths are at most {MAX_PATH_BYTES}")]
    PathTooLong { path: String, len: usize },
    #[error("{file:?} is a file (or link) and also the folder of {inside:?}")]
    FileAndFolder { file: String, inside: String },
    #[error("{a:?} and {b:?} differ only in case")]
    CaseClash { a: String, b: String },
    #[error("the package has no file")]
    Empty,
}

/// What [`check`] found that installs but is worth a warning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Warnings {
    /// Pairs of names that differ only in case (when not refused).
    pub case_clashes: Vec<(String, String)>,
}

/// Checks a package's entries (`(path, is_folder)`, paths normalised: relative, `/`-separated,
/// no trailing `/`).
pub fn check<'a>(
    entries: impl IntoIterator<Item = (&'a str, bool)>,
    refuse_case_clashes: bool,
) -> Result<Warnings, Uninstallable> {
    let entries: Vec<(&str, bool)> = entries.into_iter().collect();
    let mut not_folders = HashSet::new();
    let mut any_file = false;
    for &(path, is_folder) in &entries {
        if path.len() > MAX_PATH_BYTES {
            return Err(Uninstallable::PathTooLong {
                path: shorten(path),
                len: path.len(),
            });
        }
        if let Some(name) = path.split('/').find(|n| n.len() > MAX_NAME_BYTES) {
            return Err(Uninstallable::NameTooLong {
                path: shorten(path),
                len: name.len(),
            });
        }
        if !is_folder {
            any_file = true;
            not_folders.insert(path);
        }
    }
    if !any_file {
        return Err(Uninstallable::Empty);
    }
    // Every folder a path needs, explicit or implied, with the entry that needs it.
    let mut by_lowercase: BTreeMap<String, &str> = BTreeMap::new();
    let mut warnings = Warnings::default();
    let mut seen = HashSet::new();
    for &(path, _) in &entries {
        let mut end = Some(path.len());
        // The path itself, then each of its folders, longest first.
        while let Some(e) = end {
            let prefix = &path[..e];
            if e < path.len() && not_folders.contains(prefix) {
                return Err(Uninstallable::FileAndFolder {
                    file: prefix.to_string(),
                    inside: path.to_string(),
                });
            }
            if !seen.insert(prefix) {
                // Its folders were looked at already.
                break;
            }
            match by_lowercase.get(&prefix.to_lowercase()) {
                Some(other) if *other != prefix => {
                    if refuse_case_clashes {
                        return Err(Uninstallable::CaseClash {
                            a: other.to_string(),
                            b: prefix.to_string(),
                        });
                    }
                    warnings
                        .case_clashes
                        .push((other.to_string(), prefix.to_string()));
                }
                Some(_) => {}
                None => {
                    by_lowercase.insert(prefix.to_lowercase(), prefix);
                }
            }
            end = prefix.rfind('/');
        }
    }
    Ok(warnings)
}

/// A very long path in a message: its start and end.
fn shorten(path: &str) -> String {
    if path.len() <= 120 {
        return path.to_string();
    }
    let start: String = path.chars().take(60).collect();
    let end: String = {
        let tail: Vec<char> = path.chars().rev().take(40).collect();
        tail.into_iter().rev().collect()
    };
    format!("{start}…{end}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(paths: &[&'static str]) -> Vec<(&'static str, bool)> {
        paths.iter().map(|p| (*p, false)).collect()
    }

    #[test]
    fn an_ordinary_package_installs() {
        let entries = vec![("bin", true), ("bin/app", false), ("lib/x.so", false)];
        assert_eq!(check(entries, true), Ok(Warnings::default()));
    }

    #[test]
    fn a_name_over_255_bytes_or_a_path_over_4096_is_refused() {
        let long = "n".repeat(256);
        let path = format!("dir/{long}");
        assert!(matches!(
            check([(path.as_str(), false)], false),
            Err(Uninstallable::NameTooLong { len: 256, .. })
        ));
        let ok = "n".repeat(255);
        assert!(check([(ok.as_str(), false)], false).is_ok());
        let deep = vec!["d".repeat(200); 21].join("/");
        assert!(matches!(
            check([(deep.as_str(), false)], false),
            Err(Uninstallable::PathTooLong { .. })
        ));
    }

    #[test]
    fn a_name_that_is_a_file_and_a_folder_is_refused_in_any_order() {
        for entries in [
            files(&["a", "a/b"]),
            files(&["a/b/c", "a/b"]),
            vec![("x/y", false), ("x/y/z", true)],
        ] {
            assert!(
                matches!(
                    check(entries.clone(), false),
                    Err(Uninstallable::FileAndFolder { .. })
                ),
                "{entries:?}"
            );
        }
        // A folder entry and files in it are fine.
        assert!(check(vec![("a", true), ("a/b", false)], false).is_ok());
    }

    #[test]
    fn an_empty_package_or_one_of_folders_only_is_refused() {
        assert_eq!(check([], false), Err(Uninstallable::Empty));
        assert_eq!(check([("a", true)], false), Err(Uninstallable::Empty));
    }

    #[test]
    fn case_only_clashes_warn_or_are_refused_per_setting() {
        let entries = files(&["Lib/a", "lib/b", "README", "readme"]);
        let warnings = check(entries.clone(), false).expect("installs on Linux");
        assert_eq!(
            warnings.case_clashes,
            vec![
                ("Lib".to_string(), "lib".to_string()),
                ("README".to_string(), "readme".to_string())
            ]
        );
        assert!(matches!(
            check(entries, true),
            Err(Uninstallable::CaseClash { .. })
        ));
    }
}
