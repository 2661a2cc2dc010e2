//! Tracing setup: human-readable by default, JSON lines with `FLEETCAST_LOG_FORMAT=json`;
//! filtering with `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

pub fn init_tracing() {
    init_tracing_with_default("info,async_nats=warn");
}

/// As [`init_tracing`] with another default filter (the CLI wants only warnings by default).
pub fn init_tracing_with_default(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("FLEETCAST_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    // Colours only for a person at a terminal: a log file or a journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // try_init: a second call (tests) keeps the first subscriber instead of panicking.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
