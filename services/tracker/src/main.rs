fn main() -> std::process::ExitCode {
    fleetcast_tracker::main()
}
