fn main() -> std::process::ExitCode {
    use fleetcast_agent::{SERVICE, Settings, run};
    // Before any thread starts: apps, hooks and health commands inherit none of the
    // capabilities the agent is given to run them as their own users.
    if let Err(e) = fleetcast_agent::isolation::pass_on_no_capabilities() {
        eprintln!("fleetcast-agent: cannot drop the capabilities its children would inherit: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let code = fleetcast_runtime::service::service_main(
        SERVICE,
        Settings::LIST_KEYS,
        fleetcast_runtime::service::Threads::One,
        run,
    );
    // Handing over to a new agent (the launcher runs it on trial next), or to this one again.
    match fleetcast_agent::launched::exit() {
        fleetcast_agent::launched::Exit::RunTrial | fleetcast_agent::launched::Exit::Restart => {
            std::process::ExitCode::from(fleetcast_agent::launched::EXIT_RUN_TRIAL)
        }
        _ => code,
    }
}
