//! `ops/bench <name>`: benchmarks that print one JSON object on their last line. Each measures a
//! reference on the same data in the same run, so ratios hold on a noisy machine.

mod agent;
mod fleet;
mod handover;
mod ingest;
mod many;
mod rebuilt;
mod selfupdate;

use std::process::ExitCode;

fn main() -> ExitCode {
    let which = std::env::args().nth(1).unwrap_or_default();
    fleetcast_runtime::telemetry::init_tracing();
    // One process of the fleet benchmark's agents, started by `fleet` itself: one thread, as
    // an agent runs.
    let mut builder = if which == fleet::AGENTS_COMMAND {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match which.as_str() {
        "ingest" => runtime.block_on(ingest::run()),
        "agent" => runtime.block_on(agent::run()),
        // The many-files part of `agent` alone.
        "many" => runtime.block_on(many::run_alone()),
        "huge" => runtime.block_on(many::run_huge()),
        // The agent updating itself (also part of `agent`).
        "selfupdate" => runtime.block_on(selfupdate::run_alone()),
        "fleet" => runtime.block_on(fleet::run()),
        fleet::AGENTS_COMMAND => runtime.block_on(fleet::run_agents()),
        _ => {
            eprintln!("usage: ops/bench ingest|agent|many|selfupdate|huge|fleet");
            return ExitCode::from(2);
        }
    };
    // Not waited for: the agents processes' blocking read of stdin would hold their exit (after
    // Ctrl-C) until the bench closes it.
    runtime.shutdown_background();
    match result {
        Ok(json) if json.is_empty() => ExitCode::SUCCESS,
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
