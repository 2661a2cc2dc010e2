//! Keeping apps apart from the agent: each app may run as its own user ([`RunAs`]), and
//! nothing an app runs as can write what the agent relies on.
//!
//! ```text
//! <data_dir>/                 0711 agent   apps pass through to their own folder, list nothing
//! <data_dir>/trust/           0700 agent   the agent's trust state
//! <data_dir>/apps/            0711 agent
//! <data_dir>/apps/<app>/      0711 agent   journal, pid file, `current` (agent-written)
//! .../<app>/versions/         0711 agent   the agent adds, switches and prunes versions here
//! .../<app>/versions/<v>/     0555 agent   installed: dirs 0555, files 0444 or 0555
//! .../<app>/data/             0700 app     the app's own writable place (FLEETCAST_DATA_DIR)
//! ```
//!
//! An installed version has no write bit for anyone, and no setuid, setgid or sticky bit: the
//! agent seals it ([`seal_tree`]) before renaming it into place, and unseals what it must
//! change again (an interrupted `.partial` it resumes, a version it prunes), which it may as
//! the owner without any capability.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The environment variable naming an app's writable folder.
pub const DATA_DIR_ENV: &str = "FLEETCAST_DATA_DIR";

/// Modes of the folders apps pass through (search only: nothing in them can be listed, and
/// only the agent writes).
pub const PASS_THROUGH: u32 = 0o711;

/// Why an app cannot run as its configured user, or the agent cannot run apps as other users:
/// each a fault of the host's settings, found at start, never worth retrying.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("user {user:?}: cannot look it up: {source}")]
    UserLookup { user: String, source: nix::Error },
    #[error("user {user:?} does not exist on this host")]
    NoSuchUser { user: String },
    #[error("group {group:?}: cannot look it up: {source}")]
    GroupLookup { group: String, source: nix::Error },
    #[error("group {group:?} does not exist on this host")]
    NoSuchGroup { group: String },
    /// A numeric user the host does not know has no primary group to fall back on.
    #[error("user {user} is not in the host's user database: give apps.group too")]
    NoGroupFor { user: String },
    #[error("user {user:?} is root: leave apps.user unset to run the app as the agent's user")]
    Root { user: String },
    #[error("cannot read /proc/self/status for the capabilities: {0}")]
    ProcStatus(#[source] io::Error),
    #[error("no CapEff line in /proc/self/status")]
    NoCapEff,
    #[error(
        "an app is configured to run as its own user (apps.user), but the agent lacks {}: \
         run it with AmbientCapabilities=CAP_SETUID CAP_SETGID CAP_KILL CAP_CHOWN \
         (ops/host/fleetcast-agent.service) or as root",
        .missing.join(", ")
    )]
    MissingCapabilities { missing: Vec<&'static str> },
}

/// The user (and group) an app, its hooks and its health command run as; supplementary groups
/// are cleared when they start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// Looks up `user` and `group` (names or numeric ids). Without a group, the user's primary
    /// group; a numeric user unknown to the host needs a group given.
    pub fn resolve(user: &str, group: Option<&str>) -> Result<RunAs, IsolationError> {
        use nix::unistd::{Gid, Group, Uid, User};
        let entry = match user.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)),
            Err(_) => User::from_name(user),
        }
        .map_err(|source| IsolationError::UserLookup {
            user: user.into(),
            source,
        })?;
        let uid = match (&entry, user.parse::<u32>()) {
            (Some(u), _) => u.uid.as_raw(),
            (None, Ok(uid)) => uid,
            (None, Err(_)) => return Err(IsolationError::NoSuchUser { user: user.into() }),
        };
        let gid = match group {
            Some(group) => {
                let found = match group.parse::<u32>() {
                    Ok(gid) => Group::from_gid(Gid::from_raw(gid)).map(|g| g.map(|g| g.gid)),
                    Err(_) => Group::from_name(group).map(|g| g.map(|g| g.gid)),
                }
                .map_err(|source| IsolationError::GroupLookup {
                    group: group.into(),
                    source,
                })?;
                match (found, group.parse::<u32>()) {
                    (Some(gid), _) => gid.as_raw(),
                    (None, Ok(gid)) => gid,
                    (None, Err(_)) => {
                        return Err(IsolationError::NoSuchGroup {
                            group: group.into(),
                        });
                    }
                }
            }
            None => match &entry {
                Some(u) => u.gid.as_raw(),
                None => return Err(IsolationError::NoGroupFor { user: user.into() }),
            },
        };
        if uid == 0 {
            return Err(IsolationError::Root { user: user.into() });
        }
        Ok(RunAs { uid, gid })
    }

    /// Makes `command` start as this user: gid and uid set in the child before it runs the
    /// program. Setting the uid also makes the standard library clear the supplementary groups
    /// (`setgroups(0)`), which needs CAP_SETGID; [`check_capabilities`] makes sure the agent
    /// has it, since without it the child would silently keep the agent's groups.
    pub fn apply(&self, command: &mut tokio::process::Command) {
        command.uid(self.uid).gid(self.gid);
    }
}

/// The capabilities the agent needs to run apps as other users (bit numbers of
/// `linux/capability.h`): CAP_SETUID and CAP_SETGID to start them, CAP_KILL to signal their
/// process groups, CAP_CHOWN to hand each its data folder.
const NEEDED: [(u32, &str); 4] = [
    (0, "CAP_CHOWN"),
    (5, "CAP_KILL"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
];

/// Checks that the agent holds what running apps as other users needs, from its effective
/// capability set (`/proc/self/status`); root holds them all. A clear error at start instead
/// of an app that fails to start (or keeps the agent's groups).
pub fn check_capabilities() -> Result<(), IsolationError> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(IsolationError::ProcStatus)?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or(IsolationError::NoCapEff)?;
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(bit, _)| effective & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(IsolationError::MissingCapabilities { missing })
    }
}

/// CAP_NET_BIND_SERVICE: the one capability the agent passes on (see below).
const CAP_NET_BIND_SERVICE: u32 = 10;

/// `struct __user_cap_header_struct` of `linux/capability.h`.
#[cfg(target_os = "linux")]
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`: one per 32 capabilities.
#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3` (two [`CapData`]).
#[cfg(target_os = "linux")]
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Calls capget or capset (`call`) for this thread with a version-3 header and the two data
/// structs that version takes: capget writes them, capset only reads them.
#[cfg(target_os = "linux")]
#[expect(
    unsafe_code,
    reason = "capget and capset are system calls without a safe wrapper in nix or std"
)]
fn capabilities(
    call: libc::c_long,
    header: &mut CapHeader,
    data: &mut [CapData; 2],
) -> io::Result<()> {
    // Any other system call would get pointers it does not expect.
    assert!(call == libc::SYS_capget || call == libc::SYS_capset);
    // SAFETY: a version-3 header and two data structs, as both calls take for that version;
    // both live across the call.
    let rc = unsafe { libc::syscall(call, header as *mut CapHeader, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Empties this thread's inheritable and ambient capability sets but for CAP_NET_BIND_SERVICE,
/// so programs it starts (apps, hooks, health commands) get none of the capabilities the agent
/// is given to run them as their own users. systemd hands the agent its capabilities as
/// ambient ones (the only way for a non-root `User=`; they are inheritable too), and those
/// would pass on through every `execve`, also after a switch to the app's user (the kernel
/// clears capabilities on a uid change only when leaving uid 0); inheritable ones would come
/// back through a program with inheritable file capabilities. The agent keeps them in its own
/// permitted and effective sets. CAP_NET_BIND_SERVICE stays when an operator grants it in a
/// drop-in, for apps that listen on a port below 1024. Capabilities are per thread: call this
/// before any other thread starts (threads started later inherit the result).
#[cfg(target_os = "linux")]
#[expect(
    unsafe_code,
    reason = "prctl is a system call without a safe wrapper in nix or std"
)]
pub fn pass_on_no_capabilities() -> io::Result<()> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    capabilities(libc::SYS_capget, &mut header, &mut data)?;
    data[0].inheritable &= 1 << CAP_NET_BIND_SERVICE;
    data[1].inheritable = 0;
    // Lowering inheritable capabilities is always allowed, and lowers the matching ambient
    // ones with them.
    capabilities(libc::SYS_capset, &mut header, &mut data)?;
    // The kernel lowered the ambient ones with the inheritable ones; lowered again explicitly
    // so this does not rest on that rule alone.
    for cap in 0..64 {
        if cap == libc::c_ulong::from(CAP_NET_BIND_SERVICE) {
            continue;
        }
        // SAFETY: PR_CAP_AMBIENT_LOWER takes a capability number and no pointers (the other
        // arguments must be 0); it changes only this thread's ambient capability set.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_LOWER as libc::c_ulong,
                cap,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            // Past the kernel's last capability (or a kernel before 4.3, without ambient
            // capabilities): nothing more to lower.
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub fn pass_on_no_capabilities() -> io::Result<()> {
    Ok(())
}

/// The mode a file is installed with: read-only for everyone, executable for everyone if the
/// package marks it executable for anyone. Never a write, setuid, setgid or sticky bit,
/// whatever the package says; readable by everyone, so an app running as its own user can read
/// its files (a package holds no secrets: every host with the app assigned fetches it).
pub fn installed_mode(package_mode: u32) -> u32 {
    if package_mode & 0o111 != 0 {
        0o555
    } else {
        0o444
    }
}

/// The mode of every folder of an installed version.
pub const INSTALLED_DIR: u32 = 0o555;

/// A step of [`walk_tree`].
pub enum Visit<'a> {
    /// A folder, before what it holds.
    Enter(&'a Path),
    /// A regular file.
    File(&'a std::fs::DirEntry),
    /// A folder, after what it holds.
    Leave(&'a Path),
}

/// Walks `dir` and every folder below it, without following links (nor visiting them): each
/// folder is entered, what it holds visited in the order the folder lists it, then left. The
/// first error stops the walk.
pub fn walk_tree(dir: &Path, visit: &mut impl FnMut(Visit) -> io::Result<()>) -> io::Result<()> {
    visit(Visit::Enter(dir))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk_tree(&entry.path(), visit)?;
        } else if kind.is_file() {
            visit(Visit::File(&entry))?;
        }
    }
    visit(Visit::Leave(dir))
}

/// Makes every folder below and including `dir` read-only (0555), deepest first. Files got
/// their mode as they were verified; links are not followed (a link's own mode means nothing).
pub fn seal_tree(dir: &Path) -> io::Result<()> {
    walk_tree(dir, &mut |visit| match visit {
        Visit::Leave(folder) => set_mode(folder, INSTALLED_DIR),
        Visit::Enter(_) | Visit::File(_) => Ok(()),
    })
}

/// Gives the agent (the owner) write access to every folder below and including `dir` and to
/// its regular files, so an interrupted `.partial` can be resumed or a version removed. Links
/// are not followed. A file with other hard links stays as it is: it is an unchanged file
/// shared with another installed version (see `assemble`), which must stay read-only there;
/// removing it needs only its folder's write bit.
pub fn unseal_tree(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    walk_tree(dir, &mut |visit| match visit {
        // Before what it holds, so it can be listed and changed however it was left.
        Visit::Enter(folder) => {
            let mode = std::fs::symlink_metadata(folder)?.permissions().mode();
            set_mode(folder, (mode & 0o7777) | 0o700)
        }
        Visit::File(entry) => {
            let meta = entry.metadata()?;
            if meta.nlink() == 1 {
                set_mode(&entry.path(), (meta.permissions().mode() & 0o7777) | 0o600)?;
            }
            Ok(())
        }
        Visit::Leave(_) => Ok(()),
    })
}

/// Removes an installed (sealed) version: unsealed first, as the agent need not be root.
pub fn remove_installed(dir: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(meta) if !meta.is_dir() => return std::fs::remove_file(dir),
        Ok(_) => {}
    }
    unseal_tree(dir)?;
    std::fs::remove_dir_all(dir)
}

/// Sets `path`'s mode (not following a link: `path` must be a folder or a file).
pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Sets a folder the agent owns to `mode` unless it has it already.
pub fn ensure_mode(dir: &Path, mode: u32) -> io::Result<()> {
    let current = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    if current != mode {
        set_mode(dir, mode)?;
    }
    Ok(())
}

/// The agent's data folder, before anything else reads it: apps may pass through it and
/// `apps/` to reach their own folder, but list nothing; the trust state is the agent's alone.
pub fn prepare_data_dir(data_dir: &Path) -> io::Result<()> {
    for dir in [data_dir.to_path_buf(), data_dir.join("apps")] {
        std::fs::create_dir_all(&dir)?;
        match ensure_mode(&dir, PASS_THROUGH) {
            // A data_dir the operator made and gave the agent write access to without handing
            // it over: its mode is the operator's call (apps as their own users may then not
            // reach their folders; the docs say which mode they need).
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot set the folder's mode to 0711");
            }
            other => other?,
        }
    }
    let trust = data_dir.join("trust");
    std::fs::create_dir_all(&trust)?;
    ensure_mode(&trust, 0o700)
}

/// The app's own writable folder `<app_dir>/data`, owned by the user it runs as (mode 0700;
/// handed over with CAP_CHOWN when that is not the agent), created on first start.
pub fn prepare_app_data(app_dir: &Path, run_as: Option<RunAs>) -> io::Result<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let data = app_dir.join("data");
    match std::fs::create_dir(&data) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(&data)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a folder", data.display()),
        ));
    }
    // Closed first, while the agent still owns it (after the hand-over only the app may).
    if meta.uid() == nix::unistd::geteuid().as_raw() && meta.mode() & 0o7777 != 0o700 {
        set_mode(&data, 0o700)?;
    }
    if let Some(run_as) = run_as
        && (meta.uid() != run_as.uid || meta.gid() != run_as.gid)
    {
        // Not following links: `data` was just checked to be a folder, and only the agent
        // writes `<app_dir>`.
        std::os::unix::fs::lchown(&data, Some(run_as.uid), Some(run_as.gid))?;
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).expect("stat").mode() & 0o7777
    }

    #[test]
    fn installed_modes_have_no_write_setuid_setgid_or_sticky_bit() {
        // Executable by anyone in the package: 0555 installed; otherwise 0444.
        let executable = [0o777, 0o755, 0o700, 0o4755, 0o2755, 0o1777, 0o001];
        let not_executable = [0o666, 0o644, 0o600, 0o6644, 0o000];
        for (packed_modes, installed) in [(&executable[..], 0o555), (&not_executable[..], 0o444)] {
            for &packed in packed_modes {
                assert_eq!(installed_mode(packed), installed, "{packed:o}");
                assert_eq!(installed_mode(packed) & 0o7222, 0, "{packed:o}");
            }
        }
    }

    #[test]
    fn a_sealed_tree_is_read_only_and_can_be_unsealed_and_removed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let v = tmp.path().join("1.0.0");
        std::fs::create_dir_all(v.join("bin/deep")).expect("dirs");
        std::fs::write(v.join("bin/run"), "x").expect("file");
        set_mode(&v.join("bin/run"), installed_mode(0o4777)).expect("mode");
        std::os::unix::fs::symlink("../../outside", v.join("bin/link")).expect("link");
        std::fs::write(tmp.path().join("outside"), "y").expect("outside");
        set_mode(&tmp.path().join("outside"), 0o640).expect("mode");
        seal_tree(&v).expect("seal");
        for dir in [&v, &v.join("bin"), &v.join("bin/deep")] {
            assert_eq!(mode(dir), 0o555, "{}", dir.display());
        }
        assert_eq!(mode(&v.join("bin/run")), 0o555);
        unseal_tree(&v).expect("unseal");
        assert_eq!(mode(&v.join("bin")), 0o755);
        assert_eq!(mode(&v.join("bin/run")), 0o755);
        // The link was never followed: what it points at kept its mode.
        assert_eq!(mode(&tmp.path().join("outside")), 0o640);
        seal_tree(&v).expect("seal again");
        remove_installed(&v).expect("remove");
        assert!(!v.exists());
        assert!(tmp.path().join("outside").exists());
        remove_installed(&v).expect("removing what is gone is fine");
    }

    #[test]
    fn the_data_folder_layout_closes_the_trust_state_and_lets_apps_pass_through() {
        let tmp = tempfile::tempdir().expect("tmp");
        let data = tmp.path().join("data");
        prepare_data_dir(&data).expect("prepare");
        assert_eq!(mode(&data), 0o711);
        assert_eq!(mode(&data.join("apps")), 0o711);
        assert_eq!(mode(&data.join("trust")), 0o700);
        let app = data.join("apps/a");
        std::fs::create_dir_all(&app).expect("app");
        let own = prepare_app_data(&app, None).expect("app data");
        assert_eq!(own, app.join("data"));
        assert_eq!(mode(&own), 0o700);
    }

    #[test]
    fn users_and_groups_resolve_by_name_or_id_and_unknown_ones_are_errors() {
        let nobody = RunAs::resolve("nobody", None).expect("nobody");
        assert_eq!(nobody.uid, 65534);
        assert_eq!(
            RunAs::resolve("65534", Some("65534")).expect("ids"),
            RunAs {
                uid: 65534,
                gid: 65534
            }
        );
        // A numeric user the host does not know, with a group: taken as given.
        assert_eq!(
            RunAs::resolve("61234", Some("61234")).expect("ids"),
            RunAs {
                uid: 61234,
                gid: 61234
            }
        );
        let unknown = RunAs::resolve("no-such-user-fc", None)
            .expect_err("unknown user")
            .to_string();
        assert!(unknown.contains("does not exist"), "{unknown}");
        let unknown = RunAs::resolve("nobody", Some("no-such-group-fc"))
            .expect_err("group")
            .to_string();
        assert!(unknown.contains("does not exist"), "{unknown}");
        let bare = RunAs::resolve("61234", None)
            .expect_err("needs a group")
            .to_string();
        assert!(bare.contains("apps.group"), "{bare}");
        let root = RunAs::resolve("root", None).expect_err("root").to_string();
        assert!(root.contains("root"), "{root}");
    }

    /// Where [`as_the_owner`] works when run as another user.
    const OWNER_DIR: &str = "FLEETCAST_TEST_OWNER_DIR";

    /// The agent runs as its own user, without CAP_DAC_OVERRIDE: sealed versions must still be
    /// pruned and an interrupted, partly sealed `.partial` resumed with only an owner's rights.
    /// Run as root (CI), the checks run in a copy of this test binary started as `nobody`
    /// (root would pass them whatever the modes); run as another user, right here.
    #[test]
    fn the_agent_need_not_be_root_to_prune_and_resume_sealed_versions() {
        let tmp = tempfile::tempdir().expect("tmp");
        if !nix::unistd::geteuid().is_root() {
            owner_checks(tmp.path());
            return;
        }
        std::os::unix::fs::chown(tmp.path(), Some(65534), Some(65534)).expect("chown");
        let exe = std::env::current_exe().expect("test binary");
        let output = std::process::Command::new(exe)
            .args([
                "--exact",
                "isolation::tests::as_the_owner",
                "--ignored",
                "--nocapture",
            ])
            .env(OWNER_DIR, tmp.path())
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run as nobody");
        let log = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{log}");
        assert!(log.contains("1 passed"), "the checks did not run: {log}");
        // What the checks left: the oldest version pruned, the others sealed.
        let root = tmp.path().join("app");
        assert!(!root.join("versions/1.0.0").exists());
        assert_eq!(mode(&root.join("versions/2.0.0")), 0o555);
        assert_eq!(mode(&root.join("versions/3.0.0/bin/run")), 0o555);
    }

    #[test]
    #[ignore = "started by the_agent_need_not_be_root_to_prune_and_resume_sealed_versions"]
    fn as_the_owner() {
        let dir = std::env::var_os(OWNER_DIR).expect("started by the test above");
        owner_checks(Path::new(&dir));
    }

    fn owner_checks(dir: &Path) {
        use crate::install::InstallRoot;
        assert!(!nix::unistd::geteuid().is_root(), "proves nothing as root");
        let v = |s: &str| semver::Version::parse(s).expect("version");
        let root = InstallRoot::new(dir.join("app")).expect("root");
        for ver in ["1.0.0", "2.0.0", "3.0.0"] {
            let d = root.version_dir(&v(ver));
            std::fs::create_dir_all(d.join("bin")).expect("dirs");
            std::fs::write(d.join("bin/run"), "#!/bin/sh\n").expect("file");
            set_mode(&d.join("bin/run"), installed_mode(0o775)).expect("mode");
            seal_tree(&d).expect("seal");
        }
        // Sealed means read-only for the owner too.
        let d = root.version_dir(&v("3.0.0"));
        let denied = std::fs::write(d.join("bin/new"), "x").expect_err("wrote into a sealed dir");
        assert_eq!(denied.kind(), io::ErrorKind::PermissionDenied);
        let denied = std::fs::OpenOptions::new()
            .append(true)
            .open(d.join("bin/run"))
            .expect_err("opened an installed file for writing");
        assert_eq!(denied.kind(), io::ErrorKind::PermissionDenied);
        // Pruning removes a sealed version.
        let removed = root.prune(2, &[v("3.0.0")]).expect("prune");
        assert_eq!(removed, vec![v("1.0.0")]);
        assert_eq!(root.installed(), vec![v("2.0.0"), v("3.0.0")]);
        // An interrupted attempt that had sealed a file and its folders is writable again.
        let partial = root.partial_dir(&v("4.0.0"));
        std::fs::create_dir_all(partial.join("bin")).expect("partial");
        std::fs::write(partial.join("bin/run"), "half").expect("file");
        set_mode(&partial.join("bin/run"), 0o444).expect("mode");
        seal_tree(&partial).expect("seal");
        unseal_tree(&partial).expect("unseal");
        std::fs::OpenOptions::new()
            .write(true)
            .open(partial.join("bin/run"))
            .expect("resumable");
        std::fs::write(partial.join("bin/other"), "x").expect("writable folder");
    }
}
