fn main() -> std::process::ExitCode {
    use fleetcast_agent::{SERVICE, Settings, run};
    // Before any thread starts: apps, hooks and health commands inherit none of the
    // capabilities the agent is given to run them as their own users.
    if let Err(e) = fleetcast_agent::isolation::clear_ambient_capabilities() {
        eprintln!("fleetcast-agent: cannot clear the ambient capabilities: {e}");
        return std::process::ExitCode::FAILURE;
    }
    fleetcast_runtime::service::service_main(
        SERVICE,
        Settings::LIST_KEYS,
        fleetcast_runtime::service::Threads::One,
        run,
    )
}
