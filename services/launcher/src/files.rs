//! The small text files in the launcher's root directory, shared by the launcher and the agent.
//!
//! Each is written whole to a temporary file, synced, renamed into place and the directory
//! synced, so a reader (or a launcher restarted after a power cut) sees the old content or the
//! new one, never a torn one. Reading a file with bad content gives an `InvalidData` error that
//! names the file; nothing here panics on what it reads.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `<version> <absolute path>`: the agent release to run.
pub const CURRENT: &str = "current";
/// `<version> <absolute path> <qualify_secs> <soak_secs>`: a release to try (agent-written).
pub const TRIAL: &str = "trial";
/// `<unix_secs> <fallback version or -> <fallback path>` (launcher-written at the trial start).
pub const TRIAL_STARTED: &str = "trial.started";
/// Written by the trial agent once it has connected and published its first heartbeat.
pub const TRIAL_QUALIFIED: &str = "trial.qualified";
/// `<version>\n<reason>`: a failed trial (launcher-written, agent-removed).
pub const TRIAL_FAILED: &str = "trial.failed";
/// `<pid> <start time>` of the agent the launcher runs.
pub const AGENT_PID: &str = "agent.pid";
/// `exits/<pid>`: `<start time or -> <exit code or -> <signal or ->` of a reaped app.
pub const EXITS: &str = "exits";
/// The launcher's listening socket (SOCK_SEQPACKET).
pub const SOCKET: &str = "launcher.sock";

/// Larger than any file here can legitimately be (two paths at most); a bigger one is refused
/// rather than read into memory.
const MAX_FILE: u64 = 16 * 1024;

/// An agent release: what `current` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub version: String,
    pub path: PathBuf,
}

/// A release to try: what `trial` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trial {
    pub version: String,
    pub path: PathBuf,
    /// The trial fails unless it writes `trial.qualified` within this time of its start.
    pub qualify: Duration,
    /// How long the qualified trial runs before it promotes itself (the agent's business).
    pub soak: Duration,
}

/// What a trial goes back to when it fails: what `trial.started` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrialStarted {
    /// When the trial started (seconds since the Unix epoch).
    pub at_unix: u64,
    /// The release that was `current`; `None`: there was no `current` (the installed agent).
    pub version: Option<String>,
    /// That release's path, or the installed agent's.
    pub path: PathBuf,
}

/// What `exits/<pid>` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The process's start time (field 22 of /proc/<pid>/stat), when the launcher could read it.
    pub start_time: Option<u64>,
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

fn bad(file: &str, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{file}: {why}"))
}

/// The error for a line of `file` whose fields are not the `expected` ones.
fn not_shaped(file: &'static str, expected: &'static str) -> impl Fn() -> io::Error + Copy {
    move || bad(file, format!("expected `{expected}`"))
}

/// Why a version or a path cannot be written to (or was read from) the launcher's files.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("empty version")]
    EmptyVersion,
    #[error("`-` is not a version")]
    DashVersion,
    #[error("version {0:?} has whitespace or control characters")]
    VersionSpaces(String),
    #[error("path {} is not UTF-8", .0.display())]
    PathNotUtf8(PathBuf),
    #[error("path {0:?} is not absolute")]
    PathNotAbsolute(String),
    #[error("path {0:?} has a line break")]
    PathLineBreak(String),
}

/// A version: non-empty, no whitespace, and not `-` (which stands for "no release" in
/// `trial.started`).
pub fn check_version(version: &str) -> Result<(), FieldError> {
    if version.is_empty() {
        Err(FieldError::EmptyVersion)
    } else if version == "-" {
        Err(FieldError::DashVersion)
    } else if version.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(FieldError::VersionSpaces(version.to_owned()))
    } else {
        Ok(())
    }
}

/// A path: absolute, UTF-8 (the files are text) and on one line.
pub fn check_path(path: &Path) -> Result<&str, FieldError> {
    let text = path
        .to_str()
        .ok_or_else(|| FieldError::PathNotUtf8(path.to_path_buf()))?;
    if !path.is_absolute() {
        Err(FieldError::PathNotAbsolute(text.to_owned()))
    } else if text.contains(['\n', '\r']) {
        Err(FieldError::PathLineBreak(text.to_owned()))
    } else {
        Ok(text)
    }
}

/// The one line of a one-line file (a final newline is optional).
fn one_line<'a>(file: &str, text: &'a str) -> io::Result<&'a str> {
    let line = text.strip_suffix('\n').unwrap_or(text);
    if line.is_empty() {
        return Err(bad(file, "empty"));
    }
    if line.contains('\n') {
        return Err(bad(file, "more than one line"));
    }
    Ok(line)
}

fn parse_version(file: &str, text: &str) -> io::Result<String> {
    check_version(text).map_err(|e| bad(file, e))?;
    Ok(text.to_owned())
}

fn parse_path(file: &str, text: &str) -> io::Result<PathBuf> {
    let path = PathBuf::from(text);
    check_path(&path).map_err(|e| bad(file, e))?;
    Ok(path)
}

fn parse_secs(file: &str, what: &str, text: &str) -> io::Result<u64> {
    text.parse::<u64>().map_err(|_| {
        bad(
            file,
            format!("{what} {text:?} is not a whole number of seconds"),
        )
    })
}

pub fn parse_current(text: &str) -> io::Result<Release> {
    let line = one_line(CURRENT, text)?;
    // The path is the rest of the line: it may hold spaces.
    let (version, path) = line
        .split_once(' ')
        .ok_or_else(not_shaped(CURRENT, "<version> <path>"))?;
    Ok(Release {
        version: parse_version(CURRENT, version)?,
        path: parse_path(CURRENT, path)?,
    })
}

pub fn format_current(release: &Release) -> io::Result<String> {
    check_version(&release.version).map_err(|e| bad(CURRENT, e))?;
    let path = check_path(&release.path).map_err(|e| bad(CURRENT, e))?;
    Ok(format!("{} {path}\n", release.version))
}

pub fn parse_trial(text: &str) -> io::Result<Trial> {
    let line = one_line(TRIAL, text)?;
    let shape = not_shaped(TRIAL, "<version> <path> <qualify_secs> <soak_secs>");
    // Version first, the two numbers last, the path (which may hold spaces) in between.
    let (version, rest) = line.split_once(' ').ok_or_else(shape)?;
    let (rest, soak) = rest.rsplit_once(' ').ok_or_else(shape)?;
    let (path, qualify) = rest.rsplit_once(' ').ok_or_else(shape)?;
    Ok(Trial {
        version: parse_version(TRIAL, version)?,
        path: parse_path(TRIAL, path)?,
        qualify: Duration::from_secs(parse_secs(TRIAL, "qualify_secs", qualify)?),
        soak: Duration::from_secs(parse_secs(TRIAL, "soak_secs", soak)?),
    })
}

pub fn format_trial(trial: &Trial) -> io::Result<String> {
    check_version(&trial.version).map_err(|e| bad(TRIAL, e))?;
    let path = check_path(&trial.path).map_err(|e| bad(TRIAL, e))?;
    Ok(format!(
        "{} {path} {} {}\n",
        trial.version,
        trial.qualify.as_secs(),
        trial.soak.as_secs()
    ))
}

pub fn parse_trial_started(text: &str) -> io::Result<TrialStarted> {
    let line = one_line(TRIAL_STARTED, text)?;
    let shape = not_shaped(TRIAL_STARTED, "<unix_secs> <version or -> <path>");
    let (at, rest) = line.split_once(' ').ok_or_else(shape)?;
    let (version, path) = rest.split_once(' ').ok_or_else(shape)?;
    Ok(TrialStarted {
        at_unix: parse_secs(TRIAL_STARTED, "start time", at)?,
        version: match version {
            "-" => None,
            v => Some(parse_version(TRIAL_STARTED, v)?),
        },
        path: parse_path(TRIAL_STARTED, path)?,
    })
}

pub fn format_trial_started(started: &TrialStarted) -> io::Result<String> {
    let version = match &started.version {
        Some(v) => {
            check_version(v).map_err(|e| bad(TRIAL_STARTED, e))?;
            v.as_str()
        }
        None => "-",
    };
    let path = check_path(&started.path).map_err(|e| bad(TRIAL_STARTED, e))?;
    Ok(format!("{} {version} {path}\n", started.at_unix))
}

/// `trial.failed`: the version on line 1, the reason on line 2.
pub fn parse_trial_failed(text: &str) -> io::Result<(String, String)> {
    let text = text.strip_suffix('\n').unwrap_or(text);
    let (version, reason) = text
        .split_once('\n')
        .ok_or_else(|| bad(TRIAL_FAILED, "expected a version line and a reason line"))?;
    if reason.is_empty() || reason.contains('\n') {
        return Err(bad(TRIAL_FAILED, "expected exactly one reason line"));
    }
    Ok((parse_version(TRIAL_FAILED, version)?, reason.to_owned()))
}

/// The reason is made one line (a spawn error could in theory hold a line break).
pub fn format_trial_failed(version: &str, reason: &str) -> String {
    let reason: String = reason
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    let reason = if reason.trim().is_empty() {
        "unknown".to_owned()
    } else {
        reason
    };
    format!("{version}\n{reason}\n")
}

/// `agent.pid`: `<pid> <start time>`.
pub fn parse_agent_pid(text: &str) -> io::Result<(u32, u64)> {
    let line = one_line(AGENT_PID, text)?;
    let (pid, start) = line
        .split_once(' ')
        .ok_or_else(not_shaped(AGENT_PID, "<pid> <start time>"))?;
    let pid = pid
        .parse::<u32>()
        .map_err(|_| bad(AGENT_PID, format!("pid {pid:?} is not a number")))?;
    let start = start
        .parse::<u64>()
        .map_err(|_| bad(AGENT_PID, format!("start time {start:?} is not a number")))?;
    Ok((pid, start))
}

fn opt<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

pub fn format_exit(exit: &Exit) -> String {
    format!(
        "{} {} {}\n",
        opt(exit.start_time),
        opt(exit.code),
        opt(exit.signal)
    )
}

pub fn parse_exit(text: &str) -> io::Result<Exit> {
    const FILE: &str = "exits/<pid>";
    let line = one_line(FILE, text)?;
    let fields: Vec<&str> = line.split(' ').collect();
    let [start, code, signal] = fields[..] else {
        return Err(bad(FILE, "expected `<start time> <code> <signal>`"));
    };
    fn field<T: std::str::FromStr>(what: &str, text: &str) -> io::Result<Option<T>> {
        if text == "-" {
            return Ok(None);
        }
        text.parse::<T>()
            .map(Some)
            .map_err(|_| bad(FILE, format!("{what} {text:?} is not a number or -")))
    }
    Ok(Exit {
        start_time: field("start time", start)?,
        code: field("exit code", code)?,
        signal: field("signal", signal)?,
    })
}

/// The text of `root/name`; `None` when it does not exist.
pub fn read(root: &Path, name: &str) -> io::Result<Option<String>> {
    let path = root.join(name);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(annotate(e, "cannot open", &path)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| annotate(e, "cannot read", &path))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(bad(name, format!("larger than {MAX_FILE} bytes")));
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| bad(name, "not UTF-8 text"))
}

/// Reads and parses `root/name`; `None` when it does not exist.
pub fn load<T>(
    root: &Path,
    name: &str,
    parse: impl FnOnce(&str) -> io::Result<T>,
) -> io::Result<Option<T>> {
    read(root, name)?.map(|text| parse(&text)).transpose()
}

pub fn exists(root: &Path, name: &str) -> bool {
    // symlink_metadata: a dangling entry still counts; only "no such file" is absence.
    fs::symlink_metadata(root.join(name)).is_ok()
}

fn annotate(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Writes `dir/name` whole: a temporary file in the same directory, synced, renamed over the
/// old one, then the directory synced (the rename itself survives a power cut).
pub fn write(dir: &Path, name: &str, content: &str) -> io::Result<()> {
    let path = dir.join(name);
    // The pid keeps two writers (the launcher and the agent) off each other's temporary file.
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.replace('/', "_"),
        std::process::id()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| annotate(e, "cannot create", &tmp))?;
        file.write_all(content.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| annotate(e, "cannot write", &tmp))?;
        fs::rename(&tmp, &path).map_err(|e| annotate(e, "cannot rename into", &path))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes `root/name`; absence is fine. The caller syncs the directory (several removals
/// share one sync).
pub fn remove(root: &Path, name: &str) -> io::Result<()> {
    let path = root.join(name);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(annotate(e, "cannot remove", &path)),
    }
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| annotate(e, "cannot sync directory", dir))
}

/// Field 22 of /proc/<pid>/stat (the start time in clock ticks since boot) and the state
/// letter (field 3). A pid and its start time name one process: a reused pid has another.
/// The live processes whose parent is `parent` (from `/proc/<pid>/stat`, field 4).
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|text| {
                let fields: Vec<&str> = text
                    .rsplit_once(')')
                    .map(|(_, rest)| rest.split_whitespace().collect())
                    .unwrap_or_default();
                fields.first() != Some(&"Z") && fields.get(1) == Some(&parent.to_string().as_str())
            })
        })
        .collect()
}

pub fn proc_stat(pid: u32) -> io::Result<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_proc_stat(&text)
}

fn parse_proc_stat(text: &str) -> io::Result<(char, u64)> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected /proc/<pid>/stat format",
        )
    };
    // The command name (field 2) is in parentheses and may itself hold spaces and `)`: the
    // fields after it start after the last `)`.
    let (_, rest) = text.rsplit_once(')').ok_or_else(bad)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields
        .first()
        .and_then(|s| s.chars().next())
        .ok_or_else(bad)?;
    // Field 3 is fields[0]; field 22 is fields[19].
    let start = fields
        .get(19)
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(bad)?;
    Ok((state, start))
}

/// The process `pid` with start time `start_time` still runs (is not gone or a zombie).
pub fn is_alive(pid: u32, start_time: u64) -> bool {
    matches!(proc_stat(pid), Ok((state, start)) if start == start_time && state != 'Z' && state != 'X')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_round_trip_and_spaces_in_path() {
        let r = Release {
            version: "1.2.3".into(),
            path: "/opt/fleet cast/agent".into(),
        };
        let text = format_current(&r).expect("format");
        assert_eq!(text, "1.2.3 /opt/fleet cast/agent\n");
        assert_eq!(parse_current(&text).expect("parse"), r);
        assert_eq!(
            parse_current("1.2.3 /a/b").expect("no final newline"),
            Release {
                version: "1.2.3".into(),
                path: "/a/b".into()
            }
        );
    }

    #[test]
    fn bad_current_is_a_clear_error() {
        for (text, want) in [
            ("", "current: empty"),
            ("1.2.3\n", "current: expected `<version> <path>`"),
            ("1.2.3 relative/path\n", "is not absolute"),
            ("1.2.3 /a\n2 /b\n", "more than one line"),
            ("- /a\n", "`-` is not a version"),
        ] {
            let e = parse_current(text).expect_err(text);
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(e.to_string().contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn trial_round_trip_and_errors() {
        let t = Trial {
            version: "2.0.0".into(),
            path: "/r/2 0/agent".into(),
            qualify: Duration::from_secs(120),
            soak: Duration::from_secs(600),
        };
        let text = format_trial(&t).expect("format");
        assert_eq!(text, "2.0.0 /r/2 0/agent 120 600\n");
        assert_eq!(parse_trial(&text).expect("parse"), t);
        for (text, want) in [
            ("2.0.0 /a 120\n", "expected `<version> <path>"),
            ("2.0.0 /a x 600\n", "qualify_secs \"x\""),
            ("2.0.0 /a 1 -5\n", "soak_secs \"-5\""),
            ("2.0.0 a 1 5\n", "not absolute"),
        ] {
            let e = parse_trial(text).expect_err(text);
            assert!(e.to_string().contains(want), "{text:?}: {e}");
        }
        let e = format_trial(&Trial {
            path: "rel".into(),
            ..t
        })
        .expect_err("relative");
        assert!(e.to_string().contains("not absolute"), "{e}");
    }

    #[test]
    fn trial_started_round_trip() {
        for s in [
            TrialStarted {
                at_unix: 1_700_000_000,
                version: Some("1.0.0".into()),
                path: "/r/1.0.0/agent".into(),
            },
            TrialStarted {
                at_unix: 5,
                version: None,
                path: "/usr/bin/fleetcast agent".into(),
            },
        ] {
            let text = format_trial_started(&s).expect("format");
            assert_eq!(parse_trial_started(&text).expect("parse"), s);
        }
        assert_eq!(
            format_trial_started(&TrialStarted {
                at_unix: 5,
                version: None,
                path: "/a".into()
            })
            .expect("format"),
            "5 - /a\n"
        );
        let e = parse_trial_started("soon - /a\n").expect_err("bad time");
        assert!(e.to_string().contains("start time \"soon\""), "{e}");
    }

    #[test]
    fn trial_failed_round_trip() {
        let text = format_trial_failed("2.0.0", "exited with code 1\nbefore qualifying");
        assert_eq!(text, "2.0.0\nexited with code 1 before qualifying\n");
        assert_eq!(
            parse_trial_failed(&text).expect("parse"),
            (
                "2.0.0".to_owned(),
                "exited with code 1 before qualifying".to_owned()
            )
        );
        assert!(parse_trial_failed("2.0.0\n").is_err());
        assert!(parse_trial_failed("2.0.0\na\nb\n").is_err());
    }

    #[test]
    fn exit_and_agent_pid() {
        let e = Exit {
            start_time: None,
            code: Some(7),
            signal: None,
        };
        assert_eq!(format_exit(&e), "- 7 -\n");
        assert_eq!(parse_exit("- 7 -\n").expect("parse"), e);
        assert_eq!(
            parse_exit("123 - 9").expect("parse"),
            Exit {
                start_time: Some(123),
                code: None,
                signal: Some(9)
            }
        );
        assert!(parse_exit("- 7").is_err());
        assert!(parse_exit("- seven -").is_err());
        assert_eq!(parse_agent_pid("42 1000\n").expect("parse"), (42, 1000));
        assert!(parse_agent_pid("42\n").is_err());
        assert!(parse_agent_pid("x 1\n").is_err());
    }

    #[test]
    fn proc_stat_handles_odd_command_names() {
        let mut fields = vec!["S".to_owned()];
        fields.extend((4..=52).map(|n| n.to_string()));
        let text = format!("12 (a) b (c)) {}\n", fields.join(" "));
        assert_eq!(parse_proc_stat(&text).expect("parse"), ('S', 22));
        assert!(parse_proc_stat("12 (a) S 1 2").is_err());
        let (_, me) = proc_stat(std::process::id()).expect("own stat");
        assert!(is_alive(std::process::id(), me));
        assert!(!is_alive(std::process::id(), me + 1));
    }

    #[test]
    fn write_replaces_whole_and_read_limits() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "f", "one\n").expect("write");
        write(dir.path(), "f", "two\n").expect("rewrite");
        assert_eq!(
            read(dir.path(), "f").expect("read").as_deref(),
            Some("two\n")
        );
        assert_eq!(read(dir.path(), "missing").expect("read"), None);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("f")],
            "no temp files left"
        );
        fs::write(dir.path().join("big"), vec![b'a'; 20_000]).expect("big");
        assert!(read(dir.path(), "big").is_err());
        fs::write(dir.path().join("bin"), [0xff, 0xfe]).expect("bin");
        assert!(read(dir.path(), "bin").is_err());
        remove(dir.path(), "f").expect("remove");
        remove(dir.path(), "f").expect("remove twice");
        assert!(!exists(dir.path(), "f"));
    }
}
