//! Tracing setup: human-readable by default, JSON lines with `FLEETCAST_LOG_FORMAT=json`;
//! filtering with `RUST_LOG` (default `info`).

pub use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line (`FLEETCAST_LOG_FORMAT=json`).
    Json,
}

impl LogFormat {
    pub fn from_env() -> Self {
        if std::env::var("FLEETCAST_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json")) {
            LogFormat::Json
        } else {
            LogFormat::Text
        }
    }
}

pub fn init_tracing() {
    init_tracing_with_default("info,async_nats=warn");
}

/// As [`init_tracing`] with another default filter (the CLI wants only warnings by default).
pub fn init_tracing_with_default(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colours only for a person at a terminal: a log file or a journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // try_init: a second call (tests) keeps the first subscriber instead of panicking.
    let _ = subscriber(filter, LogFormat::from_env(), ansi, std::io::stderr).try_init();
}

/// The subscriber every fleetcast program logs through, writing to `writer`: one place, so a
/// test can see exactly the lines a program writes (`fleetcast-agent`'s forwarded app output).
pub fn subscriber<W>(
    filter: EnvFilter,
    format: LogFormat,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(builder.json().finish()),
    }
}
