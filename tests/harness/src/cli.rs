//! The `fleetcast` command as CI and operators run it against a test server.

use std::ffi::OsStr;
use std::process::Command;

/// The `fleetcast` binary `bin` with `args`, talking to the test server at `nats_url`; the
/// caller adds what else it needs (stdin, a time-out) and runs it.
pub fn command(bin: impl AsRef<OsStr>, args: &[&str], nats_url: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("FLEETCAST_NATS_URL", nats_url)
        // The test servers have no accounts or TLS.
        .env("FLEETCAST_NATS_INSECURE_DEV", "true");
    cmd
}

/// What a command wrote, as text (invalid UTF-8 replaced).
pub fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}
