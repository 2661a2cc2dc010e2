//! The whole of a service binary's `main`: flags, tracing, settings, signals, run, exit code.

use std::fmt::Display;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// TOML settings file; every key can also be set as FLEETCAST_<SERVICE>_<KEY>.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

/// How many threads run a service's async work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// One per core: the pipeline services, whose work is CPU-bound and parallel.
    PerCore,
    /// One: the agent, which runs on every host and mostly waits; another worker would cost
    /// memory (its stack and allocator arena) for nothing.
    One,
}

pub fn service_main<S, F, Fut, E>(
    service: &str,
    list_keys: &[&str],
    threads: Threads,
    run: F,
) -> ExitCode
where
    S: DeserializeOwned,
    F: FnOnce(S, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let args = Args::parse();
    crate::telemetry::init_tracing();
    let settings: S = match crate::load_settings(service, args.config.as_deref(), list_keys) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "{service}: bad configuration");
            return ExitCode::from(2);
        }
    };
    let mut builder = match threads {
        Threads::PerCore => tokio::runtime::Builder::new_multi_thread(),
        Threads::One => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = crate::shutdown_on_signals();
        tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "starting");
        match run(settings, shutdown).await {
            Ok(()) => {
                tracing::info!(service, "stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(service, error = %e, "failed");
                ExitCode::FAILURE
            }
        }
    })
}
