//! Drop-folder file names: `NAME-VERSION.zip`, e.g. `collector-2.1.0-rc.1.zip`.

use fleetcast_events::{AppName, InvalidName};
use semver::Version;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageName {
    pub app: AppName,
    pub version: Version,
}

/// What the watcher does with a file in the drop folder, decided by its name alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameVerdict {
    /// Hidden, or still being written under a temporary name: leave it alone.
    Ignore,
    Package(PackageName),
    /// Not a zip, or a zip whose name is wrong: reject it, for this reason.
    Invalid(NameError),
}

/// Why a file name is not a package's `NAME-VERSION.zip`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Said to whoever dropped some other file in the drop folder: what a package is named.
    #[error("{file_name:?} is not a zip: packages are NAME-VERSION.zip (e.g. collector-1.2.3.zip)")]
    NotZip { file_name: String },
    /// Said to whoever names an archive for the CLI (which may give `--app` and `--version`).
    #[error("{file_name:?} does not end in .zip")]
    NoZipSuffix { file_name: String },
    /// No `-` is followed by a semantic version.
    #[error("{stem:?} is not NAME-VERSION with a semantic version (e.g. collector-1.2.3.zip)")]
    NoVersion { stem: String },
    /// A version follows, but what comes before it is no app name.
    #[error(transparent)]
    App(#[from] InvalidName),
}

/// Suffixes copy tools, browsers and editors use while a file is still being written, or for
/// their own backups and swap files (vim's are also hidden: `.name.swp`).
const TEMPORARY_SUFFIXES: [&str; 8] = [
    ".tmp",
    ".part",
    ".partial",
    ".crdownload",
    ".download",
    ".filepart",
    ".swp",
    "~",
];

/// A file still being written under a temporary name, or not meant for anyone: hidden files
/// (`.name`, which is also how rsync and many tools write before a rename), the suffixes above,
/// and emacs' `#name#` autosaves. The watcher never touches these.
fn is_temporary_or_hidden(file_name: &str) -> bool {
    file_name.starts_with('.')
        || (file_name.len() > 1 && file_name.starts_with('#') && file_name.ends_with('#'))
        || TEMPORARY_SUFFIXES.iter().any(|s| file_name.ends_with(s))
}

pub fn classify_file_name(file_name: &str) -> NameVerdict {
    if is_temporary_or_hidden(file_name) {
        return NameVerdict::Ignore;
    }
    // Anything else is meant as a package: a wheel, a tarball or a stray note is refused
    // where its sender can see why, instead of lying in the folder unnoticed.
    let Some(stem) = file_name.strip_suffix(".zip") else {
        return NameVerdict::Invalid(NameError::NotZip {
            file_name: file_name.to_string(),
        });
    };
    match parse_stem(stem) {
        Ok(name) => NameVerdict::Package(name),
        Err(reason) => NameVerdict::Invalid(reason),
    }
}

/// Parses `NAME-VERSION.zip`.
pub fn parse_package_file_name(file_name: &str) -> Result<PackageName, NameError> {
    let stem = file_name
        .strip_suffix(".zip")
        .ok_or_else(|| NameError::NoZipSuffix {
            file_name: file_name.to_string(),
        })?;
    parse_stem(stem)
}

/// App names may contain '-', so the version starts at the first '-' followed by text that
/// parses as a semver version.
fn parse_stem(stem: &str) -> Result<PackageName, NameError> {
    for (i, _) in stem.match_indices('-') {
        let (app, rest) = (&stem[..i], &stem[i + 1..]);
        if let Ok(version) = Version::parse(rest) {
            let app = AppName::try_from(app)?;
            return Ok(PackageName { app, version });
        }
    }
    Err(NameError::NoVersion {
        stem: stem.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let n = parse_package_file_name("my-app-1.2.3-rc.1.zip").expect("valid");
        assert_eq!(n.app, "my-app");
        assert_eq!(n.version, Version::parse("1.2.3-rc.1").expect("v"));
        assert!(matches!(
            parse_package_file_name("collector.zip"),
            Err(NameError::NoVersion { .. })
        ));
        assert!(matches!(
            parse_package_file_name("collector-1.2.zip"),
            Err(NameError::NoVersion { .. })
        ));
        assert!(matches!(
            parse_package_file_name("Bad App-1.2.3.zip"),
            Err(NameError::App(_))
        ));
        assert!(matches!(
            parse_package_file_name("collector-1.2.3.tar"),
            Err(NameError::NoZipSuffix { .. })
        ));
        assert_eq!(
            classify_file_name("collector-1.0.0.zip.part"),
            NameVerdict::Ignore
        );
        assert_eq!(
            classify_file_name(".collector-1.0.0.zip"),
            NameVerdict::Ignore
        );
        for temporary in [
            "collector-1.0.0.zip.tmp",
            "collector-1.0.0.zip.crdownload",
            "collector-1.0.0.zip~",
            ".collector-1.0.0.zip.swp",
            ".collector-1.0.0.zip.Xa3b9Q",
            "#notes.txt#",
            ".DS_Store",
        ] {
            assert_eq!(
                classify_file_name(temporary),
                NameVerdict::Ignore,
                "{temporary}"
            );
        }
        // Any other file is meant as a package, and refused visibly when it is not one.
        for other in [
            "notes.txt",
            "collector-1.0.0-py3-none-any.whl",
            "collector-1.0.0.tar.gz",
            "collector-1.0.0",
            "#",
        ] {
            assert!(
                matches!(classify_file_name(other), NameVerdict::Invalid(e) if e.to_string().contains("not a zip")),
                "{other}"
            );
        }
        assert!(matches!(
            classify_file_name("collector-latest.zip"),
            NameVerdict::Invalid(NameError::NoVersion { .. })
        ));
    }
}
