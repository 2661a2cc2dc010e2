fn main() -> std::process::ExitCode {
    fleetcast_watcher::main()
}
