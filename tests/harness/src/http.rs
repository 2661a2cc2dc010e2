//! One plain HTTP/1.1 request to a server on loopback, as the tests' apps and probes are asked.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// `GET path` from 127.0.0.1:`port`, waiting up to `read_timeout` (or for ever) for the
/// answer: its status and body. `None` while nothing listens, or when the answer is cut short
/// (no status line, or no end of the headers).
pub fn get(port: u16, path: &str, read_timeout: Option<Duration>) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(read_timeout).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}
