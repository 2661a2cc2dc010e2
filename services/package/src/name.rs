//! Drop-folder file names: `NAME-VERSION.zip`, e.g. `collector-2.1.0-rc.1.zip`.

use fleetcast_events::names::validate_app_name;
use semver::Version;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageName {
    pub app: String,
    pub version: Version,
}

/// What the watcher does with a file in the drop folder, decided by its name alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameVerdict {
    /// Not a package or still being written under a temporary name: leave it alone.
    Ignore,
    Package(PackageName),
    /// Looks like a package but the name is wrong: reject with this reason.
    Invalid(String),
}

/// Suffixes copy tools and editors use while a file is still being written.
const TEMPORARY_SUFFIXES: [&str; 6] = [".tmp", ".part", ".partial", ".crdownload", ".swp", "~"];

pub fn classify_file_name(file_name: &str) -> NameVerdict {
    if file_name.starts_with('.') || TEMPORARY_SUFFIXES.iter().any(|s| file_name.ends_with(s)) {
        return NameVerdict::Ignore;
    }
    let Some(stem) = file_name.strip_suffix(".zip") else {
        return NameVerdict::Ignore;
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
            validate_app_name(app)?;
            return Ok(PackageName {
                app: app.to_string(),
                version,
            });
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
        assert_eq!(classify_file_name("notes.txt"), NameVerdict::Ignore);
        assert!(matches!(
            classify_file_name("collector-latest.zip"),
            NameVerdict::Invalid(_)
        ));
    }
}
