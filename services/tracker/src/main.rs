fn main() -> std::process::ExitCode {
    use fleetcast_tracker::{SERVICE, run};
    fleetcast_runtime::service::service_main(
        SERVICE,
        &[],
        fleetcast_runtime::service::Threads::PerCore,
        run,
    )
}
