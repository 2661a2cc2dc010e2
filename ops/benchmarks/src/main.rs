//! `ops/bench <name>`: benchmarks that print one JSON object on their last line. Each measures a
//! reference on the same data in the same run, so ratios hold on a noisy machine.

mod agent;
mod fleet;
mod ingest;

use std::process::ExitCode;

fn main() -> ExitCode {
    let which = std::env::args().nth(1).unwrap_or_default();
    fleetcast_runtime::telemetry::init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match which.as_str() {
        "ingest" => runtime.block_on(ingest::run()),
        "agent" => runtime.block_on(agent::run()),
        "fleet" => runtime.block_on(fleet::run()),
        _ => {
            eprintln!("usage: ops/bench ingest|agent|fleet");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
