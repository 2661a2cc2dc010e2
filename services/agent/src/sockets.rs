//! Listening sockets the agent owns and hands to every process of an app (`apps[].listen`), by
//! systemd's socket-activation protocol: the sockets are the child's file descriptors 3, 4, …,
//! `LISTEN_FDS` says how many, `LISTEN_PID` is the child's own pid (so a grandchild that
//! inherits the variables does not take them for its own), and `LISTEN_FDNAMES` names each by
//! its address.
//!
//! The socket outlives every version of the app. While one version drains and the next starts,
//! nothing listens in user space, yet the socket is still open: connections wait in the
//! kernel's queue ([`BACKLOG`]) and are accepted by the next version, instead of being refused
//! as they are when each version binds the port itself.
//!
//! `LISTEN_PID` cannot be set before the child exists, and the environment of a command is
//! fixed before it forks, so the app is started through `/bin/sh`, which sets it to its own pid
//! and `exec`s the app in the same process: the pid the app sees is the one the variable names.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

use command_fds::{CommandFdExt, FdMapping};
use socket2::{Domain, Protocol, Socket, Type};

/// Connections the kernel holds for an app between two versions (capped by
/// `net.core.somaxconn`, 4096 by default).
pub const BACKLOG: i32 = 4096;

/// The first descriptor of the protocol (after stdin, stdout and stderr).
const FIRST_FD: i32 = 3;

/// Sets `LISTEN_PID` to the pid that then runs the app (`$0` is the program, `$@` its args).
const SET_PID_AND_EXEC: &str = "LISTEN_PID=$$ exec \"$0\" \"$@\"";

/// An app's listening sockets, bound once when the agent starts.
#[derive(Debug)]
pub struct Sockets {
    addrs: Vec<SocketAddr>,
    sockets: Vec<Socket>,
}

/// Two sets are the same when they listen on the same addresses (what a process spec compares).
impl PartialEq for Sockets {
    fn eq(&self, other: &Self) -> bool {
        self.addrs == other.addrs
    }
}
impl Eq for Sockets {}

impl Sockets {
    /// Binds and listens on every address (TCP; the port may be 0 for any free one). An address
    /// another process holds is an error that names it.
    pub fn bind(addrs: &[SocketAddr]) -> std::io::Result<Sockets> {
        let mut sockets = Vec::with_capacity(addrs.len());
        let mut bound = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{addr}: {e}"));
            let socket = Socket::new(
                Domain::for_address(*addr),
                Type::STREAM,
                Some(Protocol::TCP),
            )
            .map_err(named)?;
            // A restarted agent binds again while connections of the last one are in TIME_WAIT.
            socket.set_reuse_address(true).map_err(named)?;
            socket.bind(&(*addr).into()).map_err(named)?;
            socket.listen(BACKLOG).map_err(named)?;
            let local = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .unwrap_or(*addr);
            bound.push(local);
            sockets.push(socket);
        }
        Ok(Sockets {
            addrs: bound,
            sockets,
        })
    }

    /// Sockets a previous agent bound for the same addresses, kept by the launcher: each must
    /// be a TCP socket bound to its configured address (any port where it says 0), or none is
    /// taken (the caller binds anew).
    pub fn from_held(addrs: &[SocketAddr], held: Vec<OwnedFd>) -> std::io::Result<Sockets> {
        if held.len() != addrs.len() {
            return Err(std::io::Error::other(format!(
                "{} of {} sockets kept",
                held.len(),
                addrs.len()
            )));
        }
        let mut sockets = Vec::with_capacity(addrs.len());
        let mut bound = Vec::with_capacity(addrs.len());
        for (addr, fd) in addrs.iter().zip(held) {
            let socket = Socket::from(fd);
            let local = socket.local_addr()?.as_socket().ok_or_else(|| {
                std::io::Error::other(format!("the socket kept for {addr} is not a TCP socket"))
            })?;
            let same = local.ip() == addr.ip() && (addr.port() == 0 || addr.port() == local.port());
            if !same || socket.r#type()? != Type::STREAM {
                return Err(std::io::Error::other(format!(
                    "the socket kept for {addr} listens on {local}"
                )));
            }
            bound.push(local);
            sockets.push(socket);
        }
        Ok(Sockets {
            addrs: bound,
            sockets,
        })
    }

    /// Each socket, in the order of the addresses (to keep them in the launcher).
    pub fn fds(&self) -> impl Iterator<Item = std::os::fd::BorrowedFd<'_>> {
        self.sockets.iter().map(AsFd::as_fd)
    }

    /// The addresses listened on (with the ports chosen for port 0).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Makes `command` start `program` with these sockets as its descriptors 3, 4, … and the
    /// protocol's variables: through `/bin/sh`, which sets `LISTEN_PID` (see the module).
    pub fn command(
        &self,
        program: &std::path::Path,
        args: &[String],
    ) -> std::io::Result<tokio::process::Command> {
        let mut command = tokio::process::Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(SET_PID_AND_EXEC)
            .arg(program)
            .args(args)
            .env("LISTEN_FDS", self.sockets.len().to_string())
            .env(
                "LISTEN_FDNAMES",
                self.addrs
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(":"),
            );
        let mut mappings = Vec::with_capacity(self.sockets.len());
        for (socket, child_fd) in self.sockets.iter().zip(FIRST_FD..) {
            let parent_fd: OwnedFd = socket.as_fd().try_clone_to_owned()?;
            mappings.push(FdMapping {
                parent_fd,
                child_fd,
            });
        }
        command
            .fd_mappings(mappings)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_child_gets_the_sockets_as_its_descriptors_with_its_own_pid() {
        let sockets = Sockets::bind(&["127.0.0.1:0".parse().expect("addr")]).expect("bind");
        let addr = sockets.addrs()[0];
        assert_ne!(addr.port(), 0);
        // The child reports the protocol's variables, its pid, and what its fd 3 is.
        let script = "echo \"$LISTEN_FDS $LISTEN_FDNAMES $LISTEN_PID $$\"; \
                      readlink /proc/$$/fd/3";
        let out = sockets
            .command(
                std::path::Path::new("/bin/sh"),
                &["-c".into(), script.into()],
            )
            .expect("command")
            .output()
            .await
            .expect("run");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let fields: Vec<&str> = lines.next().unwrap_or_default().split(' ').collect();
        assert_eq!(fields[..2], ["1", addr.to_string().as_str()], "{text}");
        assert_eq!(
            fields[2], fields[3],
            "LISTEN_PID is the app's own pid: {text}"
        );
        assert!(
            lines.next().unwrap_or_default().starts_with("socket:"),
            "{text}"
        );
        // The agent still listens: a connection made now waits for the next version.
        assert!(std::net::TcpStream::connect(addr).is_ok());
    }

    #[test]
    fn an_address_in_use_is_an_error_that_names_it() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr");
        let error = Sockets::bind(&[addr]).expect_err("in use");
        assert!(error.to_string().contains(&addr.to_string()), "{error}");
    }
}
