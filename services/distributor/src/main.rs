fn main() -> std::process::ExitCode {
    fleetcast_distributor::main()
}
