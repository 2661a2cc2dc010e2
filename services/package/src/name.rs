//! Drop-folder file names: `NAME-VERSION.zip`, e.g. `collector-2.1.0-rc.1.zip`.

use fleetcast_events::AppName;
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
    /// Not a zip, or a zip whose name is wrong: reject with this reason.
    Invalid(String),
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
        return NameVerdict::Invalid(format!(
            "{file_name:?} is not a zip: packages are NAME-VERSION.zip (e.g. collector-1.2.3.zip)"
        ));
    };
    match parse_stem(stem) {
        Ok(name) => NameVerdict::Package(name),
        Err(reason) => NameVerdict::Invalid(reason),
    }
}

/// Parses `NAME-VERSION.zip`.
pub fn parse_package_file_name(file_name: &str) -> Result<PackageName, String> {
    let stem = file_name
        .strip_suffix(".zip")
        .ok_or_else(|| format!("{file_name:?} does not end in .zip"))?;
    parse_stem(stem)
}

/// App names may contain '-', so the version starts at the first '-' followed by text that
/// parses as a semver version.
fn parse_stem(stem: &str) -> Result<PackageName, String> {
    for (i, _) in stem.match_indices('-') {
        let (app, rest) = (&stem[..i], &stem[i + 1..]);
        if let Ok(version) = Version::parse(rest) {
            let app = AppName::try_from(app).map_err(|e| e.to_string())?;
            return Ok(PackageName { app, version });
        }
    }
    Err(format!(
        "{stem:?} is not NAME-VERSION with a semantic version (e.g. collector-1.2.3.zip)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let n = parse_package_file_name("my-app-1.2.3-rc.1.zip").expect("valid");
        assert_eq!(n.app, "my-app");
        assert_eq!(n.version, Version::parse("1.2.3-rc.1").expect("v"));
        assert!(parse_package_file_name("collector.zip").is_err());
        assert!(parse_package_file_name("collector-1.2.zip").is_err());
        assert!(parse_package_file_name("Bad App-1.2.3.zip").is_err());
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
                matches!(classify_file_name(other), NameVerdict::Invalid(m) if m.contains("not a zip")),
                "{other}"
            );
        }
        assert!(matches!(
            classify_file_name("collector-latest.zip"),
            NameVerdict::Invalid(_)
        ));
    }
}
