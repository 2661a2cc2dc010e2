fn main() -> std::process::ExitCode {
    use fleetcast_agent::{SERVICE, Settings, run};
    fleetcast_runtime::service::service_main_single_thread(SERVICE, Settings::LIST_KEYS, run)
}
