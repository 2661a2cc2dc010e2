fn main() -> std::process::ExitCode {
    use fleetcast_agent::{SERVICE, Settings, run};
    // Before any thread starts: apps, hooks and health commands inherit none of the
    // capabilities the agent is given to run them as their own users.
    if let Err(e) = fleetcast_agent::isolation::pass_on_no_capabilities() {
        eprintln!("fleetcast-agent: cannot drop the capabilities its children would inherit: {e}");
        return std::process::ExitCode::FAILURE;
    }
    fleetcast_runtime::service::service_main(
        SERVICE,
        Settings::LIST_KEYS,
        fleetcast_runtime::service::Threads::One,
        run,
    )
}
