fn main() -> std::process::ExitCode {
    fleetcast_runtime::service::service_main(
        fleetcast_watcher::SERVICE,
        &[],
        fleetcast_runtime::service::Threads::PerCore,
        fleetcast_watcher::run,
    )
}
