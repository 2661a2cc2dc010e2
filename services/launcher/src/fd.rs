//! The few places that turn raw fd numbers into owned fds, and the fd mapping done between
//! fork and exec. nix returns accepted sockets and received fds as raw numbers and std has no
//! safe way to place fds at given numbers in a child: each function here says why its unsafe
//! block is sound, so the rest of the crate stays safe code.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, SockFlag};

/// The most fds one SCM_RIGHTS message can carry (the kernel's SCM_MAX_FD). The receive
/// buffer has room for all of them, so the kernel never truncates the control data (it would
/// leave the fds that did fit in our table with no way to find them).
const SCM_MAX_FD: usize = 253;

/// Accepts a pending connection (close-on-exec, non-blocking); `Ok(None)` when there is none.
#[expect(
    unsafe_code,
    reason = "nix's accept4 returns the new socket as a raw fd number"
)]
pub(crate) fn accept(listener: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
    match socket::accept4(
        listener.as_raw_fd(),
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    ) {
        // SAFETY: accept4 just created this fd and returned it to us alone.
        Ok(raw) => Ok(Some(unsafe { OwnedFd::from_raw_fd(raw) })),
        Err(nix::errno::Errno::EAGAIN) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// One received message.
pub(crate) struct Received {
    /// 0 with no fds: the peer closed the connection.
    pub len: usize,
    /// The message was longer than the buffer (its rest is lost).
    pub truncated: bool,
    pub fds: Vec<OwnedFd>,
}

/// Receives one message without blocking; `Ok(None)` when none is pending. Received fds are
/// close-on-exec (they reach an agent only through the explicit mapping below).
#[expect(
    unsafe_code,
    reason = "nix's recvmsg returns received fds (SCM_RIGHTS) as raw fd numbers"
)]
pub(crate) fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<Received>> {
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = match socket::recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    ) {
        Ok(msg) => msg,
        Err(nix::errno::Errno::EAGAIN) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut fds = Vec::new();
    // With room for SCM_MAX_FD fds the control data is never truncated; should it be anyway,
    // cmsgs() refuses to iterate and the error is reported (the fds are then lost, not misused).
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raws) = c {
            for raw in raws {
                // SAFETY: the kernel installed this fd in our table for this message just now;
                // nothing else knows its number.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
    }
    Ok(Some(Received {
        len: msg.bytes,
        truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
        fds,
    }))
}

/// Takes ownership of an fd this process inherited at `raw` (checked to be open) and makes it
/// close-on-exec, so the agent's own children do not inherit it.
#[expect(
    unsafe_code,
    reason = "inherited fds are known only by number (from the launcher's environment list)"
)]
pub(crate) fn inherited(raw: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD/F_SETFD take no pointers; on a closed number they fail with EBADF.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("fd {raw} is not open: {}", io::Error::last_os_error()),
        ));
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(raw, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the launcher handed this fd to this process for it to own; `Launcher::from_env`
    // takes each number once per process (a second call takes none), so no other owner exists.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Prepares `cmd`'s child: `sources[i]` at fd `3 + i` (not close-on-exec), the signal mask
/// emptied and SIGPIPE back to its default action (the launcher blocks SIGTERM, SIGINT and
/// SIGCHLD for its signalfd and ignores SIGPIPE; a child inherits both, and std does not undo
/// them once a `pre_exec` is set: an agent with SIGTERM blocked could not be stopped), and its
/// open-file soft limit set back to `nofile_soft` when given.
///
/// The caller makes sure that every source fd number is at least `3 + sources.len()` and that
/// every number from 3 to `3 + sources.len()` is taken in this process while it spawns (see
/// `Daemon::spawn_process`), so std's own fds for the spawn (its exec-error pipe) are above the
/// targets too: the dup2 calls below then overwrite only fds that are close-on-exec anyway
/// (they would vanish at exec) and never a source or std's pipe.
#[expect(
    unsafe_code,
    reason = "placing fds at given numbers and resetting signals in the child needs pre_exec"
)]
pub(crate) fn prepare_child(cmd: &mut Command, sources: Vec<OwnedFd>, nofile_soft: Option<u64>) {
    let raws: Vec<RawFd> = sources.iter().map(|fd| fd.as_raw_fd()).collect();
    let restore = nofile_soft.map(|soft| {
        // The hard limit is read now: the child should do as little as possible.
        let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(_, h)| h)
            .unwrap_or(soft);
        libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        }
    });
    let empty: libc::sigset_t = *nix::sys::signal::SigSet::empty().as_ref();
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed: it calls dup2, setrlimit, pthread_sigmask and signal only, and
    // allocates nothing (`raws`, `restore` and `empty` were built before). It keeps `sources`
    // alive (moved in) so the numbers stay valid until the Command is dropped after the spawn.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &sources;
            for (i, raw) in raws.iter().enumerate() {
                // dup2 leaves the new fd without FD_CLOEXEC: the agent inherits it.
                if libc::dup2(*raw, 3 + i as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(limit) = &restore
                && libc::setrlimit(libc::RLIMIT_NOFILE, limit) < 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::signal(libc::SIGPIPE, libc::SIG_DFL) == libc::SIG_ERR {
                return Err(io::Error::last_os_error());
            }
            let rc = libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(())
        });
    }
}
