//! The fd store's requests over `launcher.sock` (SOCK_SEQPACKET: one message per request).
//!
//! - `store NAME` with exactly one fd attached (SCM_RIGHTS): keep it, replacing any fd of that
//!   name. No answer unless refused.
//! - `remove NAME`: forget (close) that fd; an unknown name is fine. No answer.
//! - `sync`: answered `ok`; since messages are handled in order, the client knows every request
//!   before it has been handled once it reads `ok`.
//!
//! A refused request is answered `err <reason>`.

/// The longest name (bytes).
pub const MAX_NAME: usize = 200;
/// The most fds the launcher stores.
pub const MAX_FDS: usize = 1024;
/// Larger than any valid request (`remove ` or `store ` and a 200-byte name).
pub const MAX_REQUEST: usize = 512;
/// The answer to `sync`.
pub const OK: &str = "ok";

/// Why a name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("name longer than {MAX_NAME} bytes")]
    TooLong,
    #[error("name {name:?} has {c:?} (allowed: A-Z a-z 0-9 . _ / -)")]
    BadChar { name: String, c: char },
}

/// Why a request, or the fd list the agent inherits, is refused (answered `err <reason>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("request is not UTF-8")]
    NotUtf8,
    #[error(transparent)]
    Name(#[from] NameError),
    /// The request's first 40 characters.
    #[error("unknown request {0:?} (expected store NAME, remove NAME or sync)")]
    Unknown(String),
    #[error("entry {entry:?} is not FD=NAME")]
    NotFdName { entry: String },
    #[error("entry {entry:?}: {fd:?} is not an fd number")]
    NotAnFd { entry: String, fd: String },
    #[error("entry {entry:?}: fd {fd} is stdin, stdout or stderr")]
    StdFd { entry: String, fd: i32 },
    #[error("entry {entry:?}: {source}")]
    EntryName { entry: String, source: NameError },
    #[error("entry {entry:?}: fd or name given twice")]
    Twice { entry: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    Store(&'a str),
    Remove(&'a str),
    Sync,
}

/// A name: 1 to 200 bytes of `[A-Za-z0-9._/-]`. The charset keeps names out of the way of the
/// `3=NAME,4=NAME` list the agent inherits and of anything shell- or log-sensitive.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME {
        return Err(NameError::TooLong);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-')))
    {
        return Err(NameError::BadChar {
            name: name.to_owned(),
            c,
        });
    }
    Ok(())
}

pub fn parse_request(bytes: &[u8]) -> Result<Request<'_>, ProtocolError> {
    let text = std::str::from_utf8(bytes).map_err(|_| ProtocolError::NotUtf8)?;
    let (verb, name) = text.split_once(' ').unwrap_or((text, ""));
    match verb {
        "sync" if name.is_empty() && !text.contains(' ') => Ok(Request::Sync),
        "store" => Ok(check_name(name).map(|()| Request::Store(name))?),
        "remove" => Ok(check_name(name).map(|()| Request::Remove(name))?),
        _ => Err(ProtocolError::Unknown(text.chars().take(40).collect())),
    }
}

pub fn format_request(request: Request<'_>) -> String {
    match request {
        Request::Store(name) => format!("store {name}"),
        Request::Remove(name) => format!("remove {name}"),
        Request::Sync => "sync".to_owned(),
    }
}

/// The `3=NAME1,4=NAME2` list: the names in order at fds 3, 4, ...
pub fn format_fd_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names
        .into_iter()
        .enumerate()
        .map(|(i, name)| format!("{}={name}", i + 3))
        .collect::<Vec<_>>()
        .join(",")
}

/// The inverse of [`format_fd_list`] (any fd numbers ≥ 3, each at most once).
pub fn parse_fd_list(text: &str) -> Result<Vec<(i32, String)>, ProtocolError> {
    let mut out: Vec<(i32, String)> = Vec::new();
    if text.is_empty() {
        return Ok(out);
    }
    for entry in text.split(',') {
        let (fd, name) = entry
            .split_once('=')
            .ok_or_else(|| ProtocolError::NotFdName {
                entry: entry.to_owned(),
            })?;
        let fd: i32 = fd.parse().map_err(|_| ProtocolError::NotAnFd {
            entry: entry.to_owned(),
            fd: fd.to_owned(),
        })?;
        if fd < 3 {
            return Err(ProtocolError::StdFd {
                entry: entry.to_owned(),
                fd,
            });
        }
        check_name(name).map_err(|source| ProtocolError::EntryName {
            entry: entry.to_owned(),
            source,
        })?;
        if out.iter().any(|(f, n)| *f == fd || n == name) {
            return Err(ProtocolError::Twice {
                entry: entry.to_owned(),
            });
        }
        out.push((fd, name.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("app/stdout").is_ok());
        assert!(check_name("web-1.listen_0").is_ok());
        assert!(check_name(&"a".repeat(200)).is_ok());
        assert!(check_name(&"a".repeat(201)).is_err());
        assert!(check_name("").is_err());
        for bad in ["a b", "a,b", "a=b", "é", "a\nb", "a:b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn requests() {
        assert_eq!(parse_request(b"sync"), Ok(Request::Sync));
        assert_eq!(parse_request(b"store a/b"), Ok(Request::Store("a/b")));
        assert_eq!(parse_request(b"remove a"), Ok(Request::Remove("a")));
        for bad in [
            &b"sync now"[..],
            b"store",
            b"store ",
            b"store a b",
            b"fetch a",
            b"",
            b"\xff",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
        for r in [Request::Sync, Request::Store("x"), Request::Remove("y")] {
            assert_eq!(parse_request(format_request(r).as_bytes()), Ok(r));
        }
    }

    #[test]
    fn fd_lists() {
        let text = format_fd_list(["a", "b/c"]);
        assert_eq!(text, "3=a,4=b/c");
        assert_eq!(
            parse_fd_list(&text),
            Ok(vec![(3, "a".to_owned()), (4, "b/c".to_owned())])
        );
        assert_eq!(format_fd_list([]), "");
        assert_eq!(parse_fd_list(""), Ok(vec![]));
        for bad in ["3", "x=a", "2=a", "3=a,3=b", "3=a,4=a", "3=a b"] {
            assert!(parse_fd_list(bad).is_err(), "{bad:?}");
        }
    }
}
