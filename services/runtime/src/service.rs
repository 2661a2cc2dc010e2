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

/// A service on the multi-threaded runtime (the pipeline services: CPU-bound work in parallel).
pub fn service_main<S, F, Fut, E>(service: &str, list_keys: &[&str], run: F) -> ExitCode
where
    S: DeserializeOwned,
    F: FnOnce(S, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    main_on(
        tokio::runtime::Builder::new_multi_thread(),
        service,
        list_keys,
        run,
    )
}

/// A service on one thread: the agent, which runs on every host and mostly waits, so an extra
/// worker thread would cost memory (its stack and allocator arena) for nothing.
pub fn service_main_single_thread<S, F, Fut, E>(
    service: &str,
    list_keys: &[&str],
    run: F,
) -> ExitCode
where
    S: DeserializeOwned,
    F: FnOnce(S, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    main_on(
        tokio::runtime::Builder::new_current_thread(),
        service,
        list_keys,
        run,
    )
}

fn main_on<S, F, Fut, E>(
    mut builder: tokio::runtime::Builder,
    service: &str,
    list_keys: &[&str],
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
