fn main() -> std::process::ExitCode {
    use fleetcast_agent::{SERVICE, Settings, run};
    fleetcast_runtime::service::service_main(
        SERVICE,
        Settings::LIST_KEYS,
        fleetcast_runtime::service::Threads::One,
        run,
    )
}
