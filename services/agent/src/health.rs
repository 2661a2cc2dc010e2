//! The health gate a new version must pass before it is committed: it stays up for `stay_up`
//! (any exit fails the gate, with its code or signal), then an optional HTTP probe must answer
//! 2xx and an optional command must exit 0, each within its timeout and a few attempts.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;

use crate::isolation::RunAs;
use crate::output::{MAX_CAPTURE, read_tail};
use crate::supervisor::Event;

pub use fleetcast_package::HealthGate;

/// Why a version failed its gate: the reason reported with `rolled_back`.
#[derive(Debug, thiserror::Error)]
pub enum GateFailure {
    #[error("exited during the health gate (code {code:?}, signal {signal:?})")]
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// The supervisor's reason (it could not start the process, or is gone).
    #[error("could not be started: {0}")]
    SpawnFailed(String),
    #[error("health probe {url} failed: {detail}")]
    Http { url: String, detail: ProbeError },
    #[error("health command failed: {0}")]
    Command(CommandError),
}

/// Why one HTTP probe failed (the gate reports its last attempt's).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{url}: only http:// probes are supported")]
    NotHttp { url: String },
    /// Connecting, sending or reading the answer.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no HTTP status line")]
    NoStatusLine,
    /// Answered, but not 2xx: the status and the start of the body (what a health endpoint
    /// says is wrong).
    #[error("status {status}: {body}")]
    Status { status: u16, body: String },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Why a command (a health command or a package's hook) failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("empty command")]
    Empty,
    /// It could not be started, or its output not read.
    #[error("{program}: {source}")]
    Io {
        program: String,
        source: std::io::Error,
    },
    #[error("{program}: no exit within {timeout:?}, killed")]
    TimedOut { program: String, timeout: Duration },
    /// It ran and failed: its exit status and the end of its stderr.
    #[error("{program} exited with {status}: {stderr}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Runs the gate against the supervisor's events for the freshly started version.
pub async fn run_gate(
    gate: &HealthGate,
    events: &mut broadcast::Receiver<Event>,
    cwd: &Path,
    env: &BTreeMap<String, String>,
    run_as: Option<RunAs>,
) -> Result<(), GateFailure> {
    let deadline = tokio::time::sleep(gate.stay_up);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            event = events.recv() => match event {
                Ok(Event::Exited { code, signal }) => return Err(GateFailure::Exited { code, signal }),
                Ok(Event::SpawnFailed { reason }) => return Err(GateFailure::SpawnFailed(reason)),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return Err(GateFailure::SpawnFailed("supervisor gone".into())),
            },
        }
    }
    if let Some(url) = &gate.http {
        retry(gate, || http_probe(url, gate.probe_timeout))
            .await
            .map_err(|detail| GateFailure::Http {
                url: url.clone(),
                detail,
            })?;
    }
    if let Some(command) = &gate.command {
        retry(gate, || {
            run_command(command, cwd, env, run_as, gate.probe_timeout)
        })
        .await
        .map_err(GateFailure::Command)?;
    }
    // A crash right at the end of the gate still counts.
    while let Ok(event) = events.try_recv() {
        if let Event::Exited { code, signal } = event {
            return Err(GateFailure::Exited { code, signal });
        }
    }
    Ok(())
}

/// `probe` until it passes, at most `probe_attempts` times (at least once) `probe_interval`
/// apart: the last attempt's error if none passed.
async fn retry<F, Fut, E>(gate: &HealthGate, mut probe: F) -> Result<(), E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let attempts = gate.probe_attempts.max(1);
    let mut attempt = 1;
    loop {
        match probe().await {
            Ok(()) => return Ok(()),
            Err(e) if attempt >= attempts => return Err(e),
            Err(_) => {}
        }
        attempt += 1;
        tokio::time::sleep(gate.probe_interval).await;
    }
}

/// One `GET` over plain HTTP/1.1 to a loopback address. Deliberately tiny: probes are local,
/// unencrypted and need only the status line, so a full HTTP client would be dead weight.
pub async fn http_probe(url: &str, timeout: Duration) -> Result<(), ProbeError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ProbeError::NotHttp { url: url.into() })?;
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nUser-Agent: fleetcast-agent\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.take(64 * 1024).read_to_end(&mut response).await?;
        let text = String::from_utf8_lossy(&response);
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or(ProbeError::NoStatusLine)?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            let body = text
                .split("\r\n\r\n")
                .nth(1)
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect::<String>();
            Err(ProbeError::Status {
                status,
                body: body.trim().to_string(),
            })
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
}

/// Runs a command (health probe or hook) to completion in its own process group, as the app's
/// user: a program in `cwd` (the version's folder) or on PATH. Past `timeout` the whole group is
/// killed, so a hung migration leaves nothing behind. Its output is kept to its last
/// [`MAX_CAPTURE`] bytes; the error carries the exit status and stderr's end.
pub async fn run_command(
    command: &[String],
    cwd: &Path,
    env: &BTreeMap<String, String>,
    run_as: Option<RunAs>,
    timeout: Duration,
) -> Result<(), CommandError> {
    let (program, args) = command.split_first().ok_or(CommandError::Empty)?;
    let mut builder = tokio::process::Command::new(crate::supervisor::program_path(program, cwd));
    builder
        .args(args)
        .current_dir(cwd)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    crate::launched::not_inherited(&mut builder);
    if let Some(run_as) = run_as {
        run_as.apply(&mut builder);
    }
    let io = |source| CommandError::Io {
        program: program.clone(),
        source,
    };
    let mut child = builder.spawn().map_err(io)?;
    let group = child.id().map(|id| Pid::from_raw(id as i32));
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let finished = async {
        let out = async {
            match stdout {
                Some(pipe) => read_tail(pipe, MAX_CAPTURE).await,
                None => Ok((Vec::new(), false)),
            }
        };
        let err = async {
            match stderr {
                Some(pipe) => read_tail(pipe, MAX_CAPTURE).await,
                None => Ok((Vec::new(), false)),
            }
        };
        let (out, err, status) = tokio::join!(out, err, child.wait());
        Ok::<_, std::io::Error>((out?, err?, status?))
    };
    let ((stdout, _), (stderr, _), status) = match tokio::time::timeout(timeout, finished).await {
        Ok(output) => output.map_err(io)?,
        Err(_) => {
            if let Some(group) = group {
                let _ = killpg(group, Signal::SIGKILL);
            }
            return Err(CommandError::TimedOut {
                program: program.clone(),
                timeout,
            });
        }
    };
    for line in String::from_utf8_lossy(&stdout).lines() {
        tracing::info!(command = %program, "{line}");
    }
    if status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&stderr);
        let tail: String = stderr
            .trim()
            .chars()
            .rev()
            .take(300)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        Err(CommandError::Failed {
            program: program.clone(),
            status,
            stderr: tail,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command pouring out megabytes on both pipes is read to its end, and the error carries
    /// the end of its stderr, not its start (the bound itself: `output::tests`).
    #[tokio::test]
    async fn a_noisy_command_is_captured_to_its_end() {
        let dir = tempfile::tempdir().expect("tmp");
        let command: Vec<String> = [
            "sh",
            "-c",
            "head -c 8000000 /dev/zero | tr '\\0' x; head -c 8000000 /dev/zero | tr '\\0' y >&2; echo THE-END >&2; exit 4",
        ]
        .map(String::from)
        .to_vec();
        let error = run_command(
            &command,
            dir.path(),
            &BTreeMap::new(),
            None,
            Duration::from_secs(60),
        )
        .await
        .expect_err("exit 4")
        .to_string();
        assert!(error.contains("exit status: 4"), "{error}");
        assert!(error.ends_with("yyyyTHE-END"), "{error}");
        assert!(error.len() < 1024, "{} bytes", error.len());
    }
}
